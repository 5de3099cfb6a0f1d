"""The distro families' profiles, detected from guests that hold each distro's own release files
as it ships them: the right profile and no warning; a release or distro a profile only half
knows: that profile and a warning saying what was assumed; anything else: the one-line error."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from imaging import config
from imaging.config import load_target
from imaging.disk.files import Guest
from imaging.errors import GuestError
from imaging.explore import proposal
from imaging.guest import clean, initrd, profiles
from imaging.guest.profiles import GuestPath, Profile

RHEL_94 = """\
NAME="Red Hat Enterprise Linux"
VERSION="9.4 (Plow)"
ID="rhel"
ID_LIKE="fedora"
VERSION_ID="9.4"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Red Hat Enterprise Linux 9.4 (Plow)"
ANSI_COLOR="0;31"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:redhat:enterprise_linux:9::baseos"
HOME_URL="https://www.redhat.com/"
DOCUMENTATION_URL="https://access.redhat.com/documentation/en-us/red_hat_enterprise_linux/9"
BUG_REPORT_URL="https://bugzilla.redhat.com/"

REDHAT_BUGZILLA_PRODUCT="Red Hat Enterprise Linux 9"
REDHAT_BUGZILLA_PRODUCT_VERSION=9.4
REDHAT_SUPPORT_PRODUCT="Red Hat Enterprise Linux"
REDHAT_SUPPORT_PRODUCT_VERSION="9.4"
"""
ROCKY_89 = """\
NAME="Rocky Linux"
VERSION="8.9 (Green Obsidian)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="8.9"
PLATFORM_ID="platform:el8"
PRETTY_NAME="Rocky Linux 8.9 (Green Obsidian)"
ANSI_COLOR="0;32"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:rocky:rocky:8:GA"
HOME_URL="https://rockylinux.org/"
BUG_REPORT_URL="https://bugs.rockylinux.org/"
SUPPORT_END="2029-05-31"
ROCKY_SUPPORT_PRODUCT="Rocky-Linux-8"
ROCKY_SUPPORT_PRODUCT_VERSION="8.9"
REDHAT_SUPPORT_PRODUCT="Rocky Linux"
REDHAT_SUPPORT_PRODUCT_VERSION="8.9"
"""
ALMA_93 = """\
NAME="AlmaLinux"
VERSION="9.3 (Shamrock Pampas Cat)"
ID="almalinux"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="AlmaLinux 9.3 (Shamrock Pampas Cat)"
ANSI_COLOR="0;34"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:almalinux:almalinux:9::baseos"
HOME_URL="https://almalinux.org/"
DOCUMENTATION_URL="https://wiki.almalinux.org/"
BUG_REPORT_URL="https://bugs.almalinux.org/"

ALMALINUX_MANTISBT_PROJECT="AlmaLinux-9"
ALMALINUX_MANTISBT_PROJECT_VERSION="9.3"
REDHAT_SUPPORT_PRODUCT="AlmaLinux"
REDHAT_SUPPORT_PRODUCT_VERSION="9.3"
"""
ORACLE_89 = """\
NAME="Oracle Linux Server"
VERSION="8.9"
ID="ol"
ID_LIKE="fedora"
VARIANT="Server"
VARIANT_ID="server"
VERSION_ID="8.9"
PLATFORM_ID="platform:el8"
PRETTY_NAME="Oracle Linux Server 8.9"
ANSI_COLOR="0;31"
CPE_NAME="cpe:/o:oracle:linux:8:9:server"
HOME_URL="https://linux.oracle.com/"
BUG_REPORT_URL="https://github.com/oracle/oracle-linux"

ORACLE_BUGZILLA_PRODUCT="Oracle Linux 8"
ORACLE_BUGZILLA_PRODUCT_VERSION=8.9
ORACLE_SUPPORT_PRODUCT="Oracle Linux"
ORACLE_SUPPORT_PRODUCT_VERSION=8.9
"""
CENTOS_7 = """\
NAME="CentOS Linux"
VERSION="7 (Core)"
ID="centos"
ID_LIKE="rhel fedora"
VERSION_ID="7"
PRETTY_NAME="CentOS Linux 7 (Core)"
ANSI_COLOR="0;31"
CPE_NAME="cpe:/o:centos:centos:7"
HOME_URL="https://www.centos.org/"
BUG_REPORT_URL="https://bugs.centos.org/"

CENTOS_MANTISBT_PROJECT="CentOS-7"
CENTOS_MANTISBT_PROJECT_VERSION="7"
REDHAT_SUPPORT_PRODUCT="centos"
REDHAT_SUPPORT_PRODUCT_VERSION="7"

"""
STREAM_9 = """\
NAME="CentOS Stream"
VERSION="9"
ID="centos"
ID_LIKE="rhel fedora"
VERSION_ID="9"
PLATFORM_ID="platform:el9"
PRETTY_NAME="CentOS Stream 9"
ANSI_COLOR="0;31"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:centos:centos:9"
HOME_URL="https://centos.org/"
BUG_REPORT_URL="https://issues.redhat.com/"
REDHAT_SUPPORT_PRODUCT="Red Hat Enterprise Linux 9"
REDHAT_SUPPORT_PRODUCT_VERSION="CentOS Stream"
"""
FEDORA_40_CLOUD = """\
NAME="Fedora Linux"
VERSION="40 (Cloud Edition)"
ID=fedora
VERSION_ID=40
VERSION_CODENAME=""
PLATFORM_ID="platform:f40"
PRETTY_NAME="Fedora Linux 40 (Cloud Edition)"
ANSI_COLOR="0;38;2;60;110;180"
LOGO=fedora-logo-icon
CPE_NAME="cpe:/o:fedoraproject:fedora:40"
HOME_URL="https://fedoraproject.org/"
DOCUMENTATION_URL="https://docs.fedoraproject.org/en-US/fedora/f40/system-administrators-guide/"
SUPPORT_URL="https://ask.fedoraproject.org/"
BUG_REPORT_URL="https://bugzilla.redhat.com/"
REDHAT_BUGZILLA_PRODUCT="Fedora"
REDHAT_BUGZILLA_PRODUCT_VERSION=40
REDHAT_SUPPORT_PRODUCT="Fedora"
REDHAT_SUPPORT_PRODUCT_VERSION=40
SUPPORT_END=2025-05-13
VARIANT="Cloud Edition"
VARIANT_ID=cloud
"""
AMAZON_2 = """\
NAME="Amazon Linux"
VERSION="2"
ID="amzn"
ID_LIKE="centos rhel fedora"
VERSION_ID="2"
PRETTY_NAME="Amazon Linux 2"
ANSI_COLOR="0;33"
CPE_NAME="cpe:2.3:o:amazon:amazon_linux:2"
HOME_URL="https://amazonlinux.com/"
SUPPORT_END="2025-06-30"
"""
AMAZON_2023 = """\
NAME="Amazon Linux"
VERSION="2023"
ID="amzn"
ID_LIKE="fedora"
VERSION_ID="2023"
PLATFORM_ID="platform:al2023"
PRETTY_NAME="Amazon Linux 2023.5.20240722"
ANSI_COLOR="0;33"
CPE_NAME="cpe:2.3:o:amazon:amazon_linux:2023"
HOME_URL="https://aws.amazon.com/linux/amazon-linux-2023/"
DOCUMENTATION_URL="https://docs.aws.amazon.com/linux/"
SUPPORT_URL="https://aws.amazon.com/premiumsupport/"
BUG_REPORT_URL="https://github.com/amazonlinux/amazon-linux-2023"
VENDOR_NAME="AWS"
VENDOR_URL="https://aws.amazon.com/"
SUPPORT_END="2028-03-15"
"""
UBUNTU_2204 = """\
PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=jammy
"""
UBUNTU_2404 = """\
PRETTY_NAME="Ubuntu 24.04 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=noble
LOGO=ubuntu-logo
"""
LEAP_155 = """\
NAME="openSUSE Leap"
VERSION="15.5"
ID="opensuse-leap"
ID_LIKE="suse opensuse"
VERSION_ID="15.5"
PRETTY_NAME="openSUSE Leap 15.5"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:opensuse:leap:15.5"
BUG_REPORT_URL="https://bugs.opensuse.org"
HOME_URL="https://www.opensuse.org/"
DOCUMENTATION_URL="https://en.opensuse.org/Portal:Leap"
LOGO="distributor-logo-Leap"
"""
TUMBLEWEED = """\
NAME="openSUSE Tumbleweed"
# VERSION="20240710"
ID="opensuse-tumbleweed"
ID_LIKE="opensuse suse"
VERSION_ID="20240710"
PRETTY_NAME="openSUSE Tumbleweed"
ANSI_COLOR="0;32"
# CPE 2.3 format, boo#1217921
CPE_NAME="cpe:2.3:o:opensuse:tumbleweed:20240710:*:*:*:*:*:*:*"
#CPE 2.2 format
#CPE_NAME="cpe:/o:opensuse:tumbleweed:20240710"
BUG_REPORT_URL="https://bugzilla.opensuse.org"
SUPPORT_URL="https://bugs.opensuse.org"
HOME_URL="https://www.opensuse.org"
DOCUMENTATION_URL="https://en.opensuse.org/Portal:Tumbleweed"
LOGO="distributor-logo-Tumbleweed"
"""
SLES_15_SP5 = """\
NAME="SLES"
VERSION="15-SP5"
VERSION_ID="15.5"
PRETTY_NAME="SUSE Linux Enterprise Server 15 SP5"
ID="sles"
ID_LIKE="suse"
ANSI_COLOR="0;32"
CPE_NAME="cpe:/o:suse:sles:15:sp5"
DOCUMENTATION_URL="https://documentation.suse.com/"
"""
DEBIAN_12 = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""
# Debian's and Ubuntu's other release files: an Ubuntu guest holds what the debian profile's
# file rules look for, and must still be ubuntu.
DEBIAN_FILES = {"/etc/debian_version": "bookworm/sid\n", "/usr/sbin/update-initramfs": ""}


def guest(root: Path, files: dict[str, str], links: dict[str, str] | None = None) -> Guest:
    for path, text in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text(text)
    for path, target in (links or {}).items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).symlink_to(target)
    return Guest(root)


KNOWN = [
    ("rhel-9.4", {"/etc/os-release": RHEL_94, "/etc/redhat-release": "Red Hat Enterprise Linux release 9.4 (Plow)\n"},
     "rhel"),
    ("rocky-8.9", {"/etc/os-release": ROCKY_89, "/etc/redhat-release": "Rocky Linux release 8.9 (Green Obsidian)\n"},
     "rhel"),
    ("alma-9.3", {"/etc/os-release": ALMA_93, "/etc/redhat-release": "AlmaLinux release 9.3 (Shamrock Pampas Cat)\n"},
     "rhel"),
    ("oracle-8.9", {"/etc/os-release": ORACLE_89, "/etc/redhat-release": "Red Hat Enterprise Linux release 8.9 (Ootpa)\n",
                    "/etc/oracle-release": "Oracle Linux Server release 8.9\n"}, "rhel"),
    ("centos-7", {"/etc/os-release": CENTOS_7, "/etc/redhat-release": "CentOS Linux release 7.9.2009 (Core)\n"}, "rhel7"),
    ("centos-6.10", {"/etc/redhat-release": "CentOS release 6.10 (Final)\n"}, "rhel6"),
    ("stream-9", {"/etc/os-release": STREAM_9, "/etc/redhat-release": "CentOS Stream release 9\n"}, "rhel"),
    ("fedora-40-cloud", {"/usr/lib/os-release": FEDORA_40_CLOUD, "/etc/redhat-release": "Fedora release 40 (Forty)\n"},
     "rhel"),
    ("amazon-2", {"/etc/os-release": AMAZON_2, "/etc/system-release": "Amazon Linux release 2 (Karoo)\n"}, "amazon2"),
    ("amazon-2023", {"/etc/os-release": AMAZON_2023,
                     "/etc/system-release": "Amazon Linux release 2023.5.20240722 (Amazon Linux)\n"}, "amazon"),
    ("ubuntu-22.04", {"/etc/os-release": UBUNTU_2204, **DEBIAN_FILES}, "ubuntu"),
    ("ubuntu-24.04", {"/etc/os-release": UBUNTU_2404, **DEBIAN_FILES}, "ubuntu"),
    ("leap-15.5", {"/etc/os-release": LEAP_155}, "suse"),
    ("leap-16.0", {"/usr/lib/os-release": LEAP_155.replace("15.5", "16.0")}, "suse"),
    ("tumbleweed", {"/usr/lib/os-release": TUMBLEWEED}, "suse"),
    ("sles-15-sp5", {"/etc/os-release": SLES_15_SP5}, "suse"),
    ("sles-16.0", {"/etc/os-release": SLES_15_SP5.replace("15-SP5", "16.0").replace("15.5", "16.0")}, "suse"),
    ("debian-12", {"/etc/os-release": DEBIAN_12, **DEBIAN_FILES}, "debian"),
    ("centos-5.11", {"/etc/redhat-release": "CentOS release 5.11 (Final)\n"}, "centos5"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "expected"), [k[1:] for k in KNOWN], ids=[k[0] for k in KNOWN])
def test_each_distro_is_its_familys_and_known(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    # Fedora's and Tumbleweed's /etc/os-release is a link to /usr/lib/os-release, as they ship it.
    links = {"/etc/os-release": "../usr/lib/os-release"} if "/usr/lib/os-release" in files else {}
    detected = profiles.detect(guest(tmp_path, files, links))
    assert (detected.profile.name, detected.assumed) == (expected, "")
    assert detected.reason


def test_the_reason_names_what_the_guest_said(tmp_path: Path) -> None:
    assert profiles.detect(guest(tmp_path, {"/etc/os-release": ROCKY_89})).reason == (
        "os-release: ID rocky, VERSION_ID 8.9"
    )


def _like(text: str, **changes: str) -> str:
    for key, value in changes.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
    return text


HALF_KNOWN = [
    ("rocky-10.1", {"/etc/os-release": _like(ROCKY_89, VERSION_ID='"10.1"', PRETTY_NAME='"Rocky Linux 10.1 (Red Quartz)"')},
     "rhel", "Rocky Linux 10.1 (Red Quartz) (rocky 10.1): profile rhel is written for rocky 8, 9, not 10.1; "
             "treated as rocky 9"),
    ("ubuntu-26.04", {"/etc/os-release": _like(UBUNTU_2404, VERSION_ID='"26.04"', PRETTY_NAME='"Ubuntu 26.04 LTS"'),
                      **DEBIAN_FILES},
     "ubuntu", "Ubuntu 26.04 LTS (ubuntu 26.04): profile ubuntu is written for ubuntu 18.04, 20.04, 22.04, 24.04, "
               "not 26.04; treated as ubuntu 24.04"),
    ("amazon-linux-1", {"/etc/os-release": _like(AMAZON_2, VERSION_ID='"2018.03"', PRETTY_NAME='"Amazon Linux AMI 2018.03"')},
     "amazon2", "Amazon Linux AMI 2018.03 (amzn 2018.03): profile amazon2 is written for amzn 2, not 2018.03; "
                "treated as amzn 2"),
    ("debian-sid", {"/etc/os-release": _like(DEBIAN_12, PRETTY_NAME='"Debian GNU/Linux trixie/sid"', VERSION_ID=""),
                    **DEBIAN_FILES},
     "debian", "Debian GNU/Linux trixie/sid (debian): profile debian is written for debian 10, 11, 12, 13, not one "
               "without a VERSION_ID; treated as profile debian"),
    # Known only by ID_LIKE: an Ubuntu derivative, a RHEL 7 and a RHEL 9 rebuild, a SUSE one.
    ("mint-21.3", {"/etc/os-release": 'NAME="Linux Mint"\nVERSION_ID="21.3"\nID=linuxmint\nID_LIKE="ubuntu debian"\n'
                                      'PRETTY_NAME="Linux Mint 21.3"\n', **DEBIAN_FILES},
     "ubuntu", "Linux Mint 21.3 (linuxmint 21.3): no profile is written for linuxmint; treated as ubuntu, the "
               "profile for its ID_LIKE ubuntu"),
    ("virtuozzo-7", {"/etc/os-release": 'NAME="Virtuozzo"\nVERSION_ID="7.5"\nID="virtuozzo"\nID_LIKE="rhel fedora"\n'
                                        'PRETTY_NAME="Virtuozzo release 7.5"\n'},
     "rhel7", "Virtuozzo release 7.5 (virtuozzo 7.5): no profile is written for virtuozzo; treated as rhel7, the "
              "profile for its ID_LIKE rhel"),
    ("eurolinux-9", {"/etc/os-release": 'NAME="EuroLinux"\nVERSION_ID="9.2"\nID="eurolinux"\nID_LIKE="rhel fedora centos"\n'
                                        'PRETTY_NAME="EuroLinux 9.2 (Stockholm)"\n'},
     "rhel", "EuroLinux 9.2 (Stockholm) (eurolinux 9.2): no profile is written for eurolinux; treated as rhel, the "
             "profile for its ID_LIKE rhel"),
    ("microos", {"/etc/os-release": 'NAME="openSUSE MicroOS"\nID="opensuse-microos"\nID_LIKE="suse opensuse '
                                    'opensuse-tumbleweed microos sl-micro"\nVERSION_ID="20240710"\n'
                                    'PRETTY_NAME="openSUSE MicroOS"\n'},
     "suse", "openSUSE MicroOS (opensuse-microos 20240710): no profile is written for opensuse-microos; treated as "
             "suse, the profile for its ID_LIKE suse"),
    # An os-release no profile names and no ID_LIKE, but Debian's files: debian, said so.
    ("debian-files", {"/etc/os-release": 'ID=acme\nVERSION_ID="3"\nPRETTY_NAME="Acme OS 3"\n', **DEBIAN_FILES},
     "debian", "Acme OS 3 (acme 3): no profile is written for acme; treated as debian, whose files it has "
               "(/etc/debian_version exists; /usr/sbin/update-initramfs exists)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("files", "expected", "warning"), [h[1:] for h in HALF_KNOWN], ids=[h[0] for h in HALF_KNOWN]
)
def test_a_half_known_guest_is_converted_with_a_warning_naming_the_assumption(
    tmp_path: Path, files: dict[str, str], expected: str, warning: str
) -> None:
    detected = profiles.detect(guest(tmp_path, files))
    assert (detected.profile.name, detected.assumed) == (expected, warning)
    assert "\n" not in detected.assumed


UNKNOWN = [
    ("arch", {"/etc/os-release": 'NAME="Arch Linux"\nPRETTY_NAME="Arch Linux"\nID=arch\nBUILD_ID=rolling\n'},
     "Arch Linux"),
    ("alpine", {"/etc/os-release": 'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.20.1\n'
                                   'PRETTY_NAME="Alpine Linux v3.20"\n'}, "Alpine Linux v3.20"),
    # rhel6's "release 6." is not Fedora Core 6's "release 6 (Zod)".
    ("fedora-core-6", {"/etc/redhat-release": "Fedora Core release 6 (Zod)\n"}, "Fedora Core release 6 (Zod)"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "name"), [u[1:] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN])
def test_a_guest_no_profile_knows_stops_with_one_line(
    tmp_path: Path, files: dict[str, str], name: str
) -> None:
    with pytest.raises(GuestError) as e:
        profiles.detect(guest(tmp_path, files))
    message = str(e.value)
    assert message.startswith(f"no profile knows this guest ({name}): propose one from the guest")
    assert "--profile" in message and "\n" not in message


def test_guest_text_stays_out_of_the_warning(tmp_path: Path) -> None:
    g = guest(
        tmp_path,
        {"/etc/os-release": 'ID="rocky\nx"\nID=rocky\nVERSION_ID="10<b>"\nPRETTY_NAME="<b>R</b>\\n"\n'},
    )
    detected = profiles.detect(g)
    # VERSION_ID with markup is no version at all; the name keeps only plain characters.
    assert detected.profile.name == "rhel" and "<" not in detected.assumed
    assert detected.assumed.startswith(
        "bR/bn (rocky): profile rhel is written for rocky 8, 9, not one without"
    )


def test_every_profile_loads_and_names_plain_guest_paths() -> None:
    adapter = TypeAdapter(GuestPath)
    names = config.available("profiles")
    assert {
        "rhel",
        "rhel7",
        "rhel6",
        "amazon",
        "amazon2",
        "ubuntu",
        "suse",
        "debian",
        "centos5",
        "generic",
    } <= set(names)
    for name in names:
        p = profiles.load_profile(name)
        paths = [p.inittab, p.securetty, p.modprobe_conf, p.modprobe_d, p.fstab, p.selinux_config, p.rc_local,
                 p.shadow, p.grub_legacy_conf, p.grub_dir, *(r.file for r in p.detect)]  # fmt: skip
        if p.initrd:
            paths += [p.initrd.tool, *p.initrd.alternatives, p.initrd.modules_file,
                      p.initrd.image.format(version="6.1.0-1-amd64")]  # fmt: skip
        for path in filter(None, paths):
            assert adapter.validate_python(path) == path, (name, path)
    for bad in ("/boot/../etc/shadow", "/etc//fstab", "/etc/./fstab", "/boot/", "etc/fstab"):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


def test_no_two_profiles_claim_one_release() -> None:
    """Detection is deterministic: an (ID, version) belongs to one profile at most."""
    claimed: dict[tuple[str, str], str] = {}
    for name in config.available("profiles"):
        for ident, versions in profiles._ids(profiles.load_profile(name)).items():
            for version in versions or ["*"]:
                assert (ident, version) not in claimed, (name, claimed[(ident, version)])
                claimed[(ident, version)] = name


def test_families_state_their_facts() -> None:
    rhel, rhel7, rhel6 = (profiles.load_profile(n) for n in ("rhel", "rhel7", "rhel6"))
    assert rhel.initrd is not None and rhel.initrd.tool == "/usr/bin/dracut"
    assert rhel.initrd.image == "/boot/initramfs-{version}.img" and "--add-drivers" in rhel.initrd.argv
    assert (rhel.grub_dir, rhel.selinux_config, rhel.kernel_package, rhel.ssh_host_keys) == (
        "/boot/grub2", "/etc/selinux/config", "kernel", "distro")  # fmt: skip
    assert (
        rhel.packages is not None
        and rhel.packages.install[0] == "dnf"
        and "dl.rockylinux.org" in rhel.packages.mirrors
    )
    # rhel7 and rhel6 build on rhel: its facts, their own package manager, detection and dracut.
    assert (
        rhel7.packages is not None
        and rhel7.packages.install[0] == "yum"
        and rhel7.selinux_config == rhel.selinux_config
    )
    assert rhel7.initrd is not None and rhel7.initrd.alternatives == ["/sbin/dracut"] and rhel7.detect == []
    assert (
        rhel6.initrd is not None
        and rhel6.initrd.tool == "/sbin/dracut"
        and "--no-hostonly" not in rhel6.initrd.argv
    )
    assert (
        rhel6.grub_legacy_conf == "/boot/grub/grub.conf"
        and rhel6.os_release is None
        and rhel6.base == "rhel7"
    )
    ubuntu, debian = profiles.load_profile("ubuntu"), profiles.load_profile("debian")
    assert ubuntu.initrd == debian.initrd and ubuntu.kernel_package == "linux-image-generic"
    assert ubuntu.detect == [] and ubuntu.packages is not None and debian.packages is not None
    assert (
        "security.ubuntu.com" in ubuntu.packages.mirrors and "deb.debian.org" not in ubuntu.packages.mirrors
    )
    assert ubuntu.packages.env == debian.packages.env  # mappings merge key by key
    suse = profiles.load_profile("suse")
    assert suse.packages is not None and suse.packages.refresh == ["zypper", "--non-interactive", "refresh"]
    assert (suse.kernel_package, suse.grub_dir) == ("kernel-default", "/boot/grub2")
    amazon, amazon2 = profiles.load_profile("amazon"), profiles.load_profile("amazon2")
    assert amazon.packages is not None and amazon2.packages is not None
    assert (amazon.packages.install[0], amazon2.packages.install[0]) == ("dnf", "yum")


def test_a_base_loop_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "a.yaml").write_text("name: a\ndescription: a\nbase: b\n")
    (tmp_path / "profiles" / "b.yaml").write_text("name: b\ndescription: b\nbase: a\n")
    monkeypatch.setenv("IMAGING_PARAMETERS", str(tmp_path))
    profiles.load_profile.cache_clear()
    try:
        with pytest.raises(Exception, match="not a profile it can build on"):
            profiles.load_profile("a")
    finally:
        profiles.load_profile.cache_clear()


def test_the_rules_table_shows_os_release_rows(tmp_path: Path) -> None:
    checks = profiles.check_rules(guest(tmp_path, {"/etc/os-release": SLES_15_SP5}))
    held = {(c.profile, c.rule) for c in checks if c.holds}
    assert ("suse", "/etc/os-release ID and VERSION_ID: opensuse-leap 15, 16; opensuse-tumbleweed any version; "
                    "sles 12, 15, 16") in held  # fmt: skip
    assert ("suse", "/etc/os-release ID_LIKE: suse, opensuse") in held
    assert not any(p == "rhel" for p, _ in held)


def _dracut_guest(root: Path, tool: str) -> Guest:
    mods = root / "lib" / "modules" / "5.14.0-362.el9.x86_64"
    mods.mkdir(parents=True)
    names = ["virtio_pci", "virtio_ring", "virtio", "virtio_blk", "virtio_net", "virtio_balloon"]
    (mods / "modules.dep").write_text("".join(f"kernel/drivers/{n}.ko.xz:\n" for n in names))
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-5.14.0-362.el9.x86_64").write_bytes(b"k")
    (root / tool.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / tool.lstrip("/")).write_text("#!/bin/bash\n")
    return Guest(root)


@pytest.mark.parametrize(("name", "tool"), [("rhel", "/usr/bin/dracut"), ("rhel7", "/sbin/dracut"),
                                            ("rhel6", "/sbin/dracut"), ("suse", "/usr/bin/dracut")])  # fmt: skip
def test_dracut_gets_the_targets_drivers_in_one_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, tool: str
) -> None:
    ran: list[list[str]] = []

    def run(root: Path, argv: list[str], **_: object) -> None:
        ran.append(argv)
        (root / argv[-2].lstrip("/")).write_bytes(gzip.compress(b"not a cpio"))

    monkeypatch.setattr(initrd.sandbox, "run", run)
    profile: Profile = profiles.load_profile(name)
    with _dracut_guest(tmp_path, tool) as g:
        made = initrd.rebuild(g, profile, initrd.choose_kernel(g), load_target("kvm"))
    drivers = "virtio_pci virtio_ring virtio virtio_blk virtio_net virtio_balloon"
    assert ran[0][0] == tool and ran[0][ran[0].index("--add-drivers") + 1] == drivers
    assert ran[0][-1] == "5.14.0-362.el9.x86_64" and made.rebuilt
    assert made.image == ("/boot/initrd-5.14.0-362.el9.x86_64" if name == "suse" else
                          "/boot/initramfs-5.14.0-362.el9.x86_64.img")  # fmt: skip


def test_no_dracut_anywhere_is_one_line(tmp_path: Path) -> None:
    with _dracut_guest(tmp_path, "/usr/bin/other") as g:
        with pytest.raises(
            GuestError, match=r"no /usr/bin/dracut \(nor /sbin/dracut\) to rebuild its initrd"
        ):
            initrd.rebuild(g, profiles.load_profile("rhel7"), initrd.choose_kernel(g), load_target("kvm"))


def test_a_half_known_guest_is_proposed_a_profile_on_its_family(tmp_path: Path) -> None:
    g = guest(tmp_path, {"/etc/os-release": _like(ROCKY_89, VERSION_ID='"10.1"')})
    text = proposal.propose(g)
    p = profiles.build(yaml.safe_load(text))
    assert (p.name, p.base) == ("rocky-10", "rhel") and p.os_release is not None
    assert p.os_release.ids == {"rocky": ["10"]} and p.initrd == profiles.load_profile("rhel").initrd
    assert "treated as rocky 9" in text


def test_a_known_guest_gets_a_whole_proposal_when_asked(tmp_path: Path) -> None:
    g = guest(tmp_path, {"/usr/lib/os-release": FEDORA_40_CLOUD, "/usr/bin/dnf": "", "/usr/bin/dracut": ""},
              {"/etc/os-release": "../usr/lib/os-release"})  # fmt: skip
    p = profiles.build(yaml.safe_load(proposal.propose(g)))
    assert (
        p.base is None
        and p.name == "fedora-40"
        and p.os_release is not None
        and p.os_release.ids == {"fedora": ["40"]}
    )
    assert p.packages is not None and p.packages.cleanup == ["dnf", "clean", "packages"]


def test_10_clean_records_the_warning_beside_the_reason(tmp_path: Path) -> None:
    g = guest(tmp_path, {"/etc/os-release": _like(ROCKY_89, VERSION_ID='"10.1"')})
    record = clean._plan(g, [], "auto", [], []).to_dict()
    assert (record["profile"], record["profile_reason"]) == ("rhel", "os-release: ID rocky, VERSION_ID 10.1")
    assert str(record["profile_assumed"]).endswith(
        "profile rhel is written for rocky 8, 9, not 10.1; treated as rocky 9"
    )
    named = clean._plan(g, [], "rhel", [], []).to_dict()  # named by the request: nothing assumed
    assert named["profile_assumed"] == "" and named["profile_reason"] == "asked for by the request"


def test_a_proposal_is_never_named_as_an_existing_profile(tmp_path: Path) -> None:
    g = guest(tmp_path, {"/etc/os-release": _like(DEBIAN_12, VERSION_ID=""), **DEBIAN_FILES})
    p = profiles.build(yaml.safe_load(proposal.propose(g)))
    assert (p.name, p.base) == ("debian-guest", "debian")
