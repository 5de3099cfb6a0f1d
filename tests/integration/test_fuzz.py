"""The fuzzed-images campaign's short form (tests/campaigns/fuzz_images.py): 50 cases of fixed
seeds and every case of the regression corpus (tests/data/fuzz-corpus/), each exported through
the CLI within its bounds; each must end with an artifact or a one-line error, the host as it
was. Its figures are printed; the campaign itself (``make campaign``) runs a thousand."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from imaging.sparse import content_digest
from tests.campaigns import fuzz_images

SHORT_CASES = 50
SEED = "short"
# A boot is most of a survivor's time: one case in twenty-five boots (the corpus's cases always do).
BOOT_SHARE = 0.04
# Above the product's own stage limits for this sample with the machine busy (a survivor took
# 45 s alone, 200 s with the host's two cores shared by a dozen boots).
CASE_SECONDS = 480

pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> fuzz_images.Bases:
    return fuzz_images.make_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_a_case_is_its_seed_and_mutations(bases: fuzz_images.Bases, tmp_path: Path) -> None:
    """The same seed gives the same case, and the same case the same bytes: a corpus entry
    replays exactly. Every kind's mutations land in the image."""
    cases = [fuzz_images.make_case(f"{SEED}:{i}", bases.regions) for i in range(12)]
    assert cases == [fuzz_images.make_case(f"{SEED}:{i}", bases.regions) for i in range(12)]
    assert {c.kind for c in cases} == set(fuzz_images.KINDS)
    for n, case in enumerate(cases[:3]):
        digests = []
        for attempt in range(2):
            image = tmp_path / f"{n}-{attempt}"
            fuzz_images.mutate(case, bases, image)
            digests.append(content_digest(image))
        assert digests[0] == digests[1]
        assert digests[0] != content_digest(bases.images[case.kind]), case.describe()


def test_fuzzed_images_end_in_an_artifact_or_a_one_line_error(
    bases: fuzz_images.Bases, tmp_path: Path
) -> None:
    replayed = [case for _, case in fuzz_images.corpus_cases()]
    new = [fuzz_images.make_case(f"{SEED}:{i}", bases.regions, BOOT_SHARE) for i in range(SHORT_CASES)]
    t0 = time.monotonic()
    outcomes = fuzz_images.campaign(replayed + new, bases, tmp_path, jobs=2, limit=CASE_SECONDS)
    print("\n" + fuzz_images.summary(outcomes, time.monotonic() - t0), file=sys.stderr)
    assert len(outcomes) == len(replayed) + SHORT_CASES
    failed = [f"{o.case.describe()}: {o.why}" for o in outcomes if o.verdict == "failed"]
    assert failed == [], "\n".join(failed)
    # The mutations reach what matters: some images are refused, some repaired and exported.
    verdicts = {o.verdict for o in outcomes}
    assert verdicts == {"survived", "refused"}
