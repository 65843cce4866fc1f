"""Ingest rate (SPEC §7): samples/s of `cvops.data.ingest` into FiftyOne (bundled MongoDB) vs a plain directory walk
+ sha256 of every file, on a few thousand synthetic images. Also shows walk + hash + decode (`load_image`, what ingest
did before issue 15), walk + hash + `verify_image` (what it does now), the same plus the media copy (everything but
FiftyOne), the bare creation of as many files (the floor of any ingest that keeps one media copy per image) and a re-ingest (all
duplicates). Ingest runs twice: copying each file into the project's media folder (the default) and hard-linking it
(`--link`). Everything runs in a throwaway project; prints side by side with the target and writes
bench/results/ingest.json."""
import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.5  # ingest samples/s ÷ walk+hash files/s (SPEC §7)


def walk_hash(src: Path) -> int:
    n = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh: hashlib.sha256(fh.read()).hexdigest()
            n += 1
    return n


def walk_hash_decode(src: Path) -> int:
    from cvops.preprocess import load_image
    n = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh: data = fh.read()
            hashlib.sha256(data).hexdigest(); load_image(data); n += 1
    return n


def walk_hash_verify(src: Path) -> int:
    "Walk + hash + the check ingest does now (`verify_image`: no full decode where the format allows it)."
    from cvops.preprocess import verify_image
    n = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh: data = fh.read()
            hashlib.sha256(data).hexdigest(); verify_image(data); n += 1
    return n


def walk_hash_verify_copy(src: Path, dest: Path) -> int:
    "Everything ingest does per new file except FiftyOne: read, hash, verify_image, write the media copy."
    import shutil
    from cvops.preprocess import verify_image
    shutil.rmtree(dest, ignore_errors=True)
    n = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh: data = fh.read()
            sha = hashlib.sha256(data).hexdigest(); verify_image(data)
            (dest / sha[:2]).mkdir(parents=True, exist_ok=True)
            with open(dest / sha[:2] / f"{sha}.png", "wb") as out: out.write(data)
            n += 1
    return n


def create_files(src: Path, dest: Path) -> int:
    "The file-system floor of any ingest that keeps a media copy per image: create as many files, same bytes each."
    import shutil
    shutil.rmtree(dest, ignore_errors=True); dest.mkdir(parents=True)
    data = b"x" * 2048
    n = sum(len(files) for _, _, files in os.walk(src))
    for i in range(n):
        with open(dest / f"{i}.png", "wb") as out: out.write(data)
    return n


def rate(fn, *args, repeat=3):
    "Best of `repeat` runs: (items/s, seconds)."
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter(); n = fn(*args); dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return n / best, best


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=3000, help="synthetic images")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ingest.json"))
    ap.add_argument("--workdir", default=None, help="folder for the sources, media copies and database (default: the "
                    "system temp folder; file creation speed differs between folders, so pick the disk you care about)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cvops-bench-ingest-", dir=args.workdir))
    os.environ.update(CVOPS_HOME=str(work / ".cvops"), CVOPS_STORE_URL=str(work / "store"), FIFTYONE_DO_NOT_TRACK="true")
    from cvops.config import set_process_defaults
    set_process_defaults()  # an entry point: OMP_WAIT_POLICY and friends, unless set
    from cvops.synth import generate
    from cvops.data import ingest
    from cvops.db import fiftyone_db
    from cvops.versions import create_version
    src = work / "src"
    generate(out=src, n=args.n, seed=0, size=args.size, progress=False)
    walk_hash(src)  # warm the page cache: every measurement below reads from memory

    walk_rate, walk_s = rate(walk_hash, src)
    decode_rate, decode_s = rate(walk_hash_decode, src)
    verify_rate, verify_s = rate(walk_hash_verify, src)
    copy_rate, copy_s = rate(walk_hash_verify_copy, src, work / "copies")
    create_rate, create_s = rate(create_files, src, work / "created")
    t0 = time.perf_counter(); fiftyone_db(); db_start = time.perf_counter() - t0
    t0 = time.perf_counter(); rep = ingest(src, "bench", progress=False); ingest_s = time.perf_counter() - t0
    assert rep.added == args.n, rep.summary()
    t0 = time.perf_counter(); rep2 = ingest(src, "bench", progress=False); reingest_s = time.perf_counter() - t0
    assert rep2.nothing_new
    t0 = time.perf_counter(); v = create_version("bench"); version_s = time.perf_counter() - t0
    import shutil
    shutil.rmtree(work / ".cvops" / "media")  # media files already there are kept, so the linking run starts empty too
    t0 = time.perf_counter(); rep_l = ingest(src, "bench-link", progress=False, link=True); link_s = time.perf_counter() - t0
    assert rep_l.added == args.n, rep_l.summary()
    link_rate = args.n / link_s
    ingest_rate = args.n / ingest_s
    ratio, link_ratio = ingest_rate / walk_rate, link_rate / walk_rate
    best = max(ratio, link_ratio)
    res = {
        "n": args.n, "size": args.size, "workdir": str(work.parent),
        "walk_hash": {"files_per_s": round(walk_rate, 1), "seconds": round(walk_s, 3)},
        "walk_hash_decode": {"files_per_s": round(decode_rate, 1), "seconds": round(decode_s, 3)},
        "walk_hash_verify": {"files_per_s": round(verify_rate, 1), "seconds": round(verify_s, 3)},
        "walk_hash_verify_copy": {"files_per_s": round(copy_rate, 1), "seconds": round(copy_s, 3)},
        "create_files": {"files_per_s": round(create_rate, 1), "seconds": round(create_s, 3)},
        "ingest": {"samples_per_s": round(ingest_rate, 1), "seconds": round(ingest_s, 3)},
        "ingest_link": {"samples_per_s": round(link_rate, 1), "seconds": round(link_s, 3)},
        "reingest_all_duplicates": {"files_per_s": round(args.n / reingest_s, 1), "seconds": round(reingest_s, 3)},
        "create_version": {"seconds": round(version_s, 3), "samples": len(v.samples)},
        "db_start_seconds": round(db_start, 2),
        "ratio_ingest_vs_walk_hash": round(ratio, 3), "ratio_ingest_vs_walk_hash_decode": round(ingest_rate / decode_rate, 3),
        "ratio_ingest_vs_walk_hash_verify_copy": round(ingest_rate / copy_rate, 3),
        "ratio_ingest_link_vs_walk_hash": round(link_ratio, 3),
        "target_ratio": TARGET, "meets_target": best >= TARGET,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    print(f"ingest benchmark: {args.n} synthetic {args.size}px PNGs in {work}, bundled MongoDB (started in {db_start:.1f} s)")
    print(f"{'measure':<40}{'rate':>14}{'seconds':>10}")
    print(f"{'walk + sha256':<40}{walk_rate:>10.0f} /s{walk_s:>10.2f}")
    print(f"{'walk + sha256 + decode (load_image)':<40}{decode_rate:>10.0f} /s{decode_s:>10.2f}")
    print(f"{'walk + sha256 + verify_image (ingest)':<40}{verify_rate:>10.0f} /s{verify_s:>10.2f}")
    print(f"{'walk + sha256 + verify + media copy':<40}{copy_rate:>10.0f} /s{copy_s:>10.2f}")
    print(f"{'create as many files (fs floor)':<40}{create_rate:>10.0f} /s{create_s:>10.2f}")
    print(f"{'cvops ingest into FiftyOne (copies)':<40}{ingest_rate:>10.0f} /s{ingest_s:>10.2f}")
    print(f"{'cvops ingest --link (hard links)':<40}{link_rate:>10.0f} /s{link_s:>10.2f}")
    print(f"{'re-ingest (all already present)':<40}{args.n / reingest_s:>10.0f} /s{reingest_s:>10.2f}")
    print(f"{'create_version (blobs + manifest)':<40}{'':>14}{version_s:>10.2f}")
    print(f"ingest ÷ walk+hash: {ratio:.3f}x (copies), {link_ratio:.3f}x (--link)   target ≥ {TARGET}x   "
          f"{'MET' if best >= TARGET else 'NOT MET'}")
    print(f"ingest ÷ walk+hash+decode: {ingest_rate / decode_rate:.3f}x   "
          f"ingest ÷ walk+hash+verify+copy (all but FiftyOne): {ingest_rate / copy_rate:.3f}x")
    print(f"a media copy per image caps any ingest at the file-creation rate: {create_rate / walk_rate:.3f}x walk+hash here")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    from cvops.db import close_db
    close_db()  # stop the benchmark's mongod before its folder goes
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
