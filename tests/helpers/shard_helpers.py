"""Helpers shared by the shard tests: read a shard set back with tarfile only (independent of the reader)."""
import tarfile
from pathlib import Path


def read_set(set_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} over every shard of a set."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(set_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples
