"""Campaigns: bounded runs of many cases nobody chose (issue 29), each a script run by `make campaign`."""
