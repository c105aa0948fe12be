"""Real bilingual text nobody here wrote: Debian's packaged manual pages, as JSONL.

English comes from the `manpages` and `manpages-dev` packages (the Linux man-pages project),
the target language from its `manpages-LANG` package (`languages.py`; e.g. `manpages-ja`, the
JM project's translations of pages of many packages). Each page
is rendered to plain text by man-db (`man -l`, 80 columns, no hyphenation or justification)
and `col -bx`, cut into documents at its top-level sections (NAME, DESCRIPTION, ...; short
sections join the next one), and deduplicated by exact text. Whole pages are held out, chosen
by a hash of the page's name, so that no section of a held-out page is ever trained on.

Translated pages keep some untranslated English (authors, copyright, code); a target document
must pass `languages.is_target_text` (a share of letters in the target's script, or a language
identifier for Latin-script languages), the rest are dropped and counted.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from replicate import languages

# The English side's Debian packages (installed with apt-get when missing); the target's is its
# languages.Target.package.
ENGLISH_PACKAGES = ("manpages", "manpages-dev")
MIN_SECTION_CHARS = 200  # shorter sections (NAME, SEE ALSO lists) join the next one


class CorpusError(RuntimeError):
    """The manual pages cannot be had; the message says what to install."""


def log(msg: str) -> None:
    print(f"[replicate] {msg}", flush=True)


# --------------------------------------------------------------------------- packages


def installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_packages(packages: list[str]) -> None:
    """Install the missing `packages` with apt-get (as root), saying so; errors say what to run."""
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise CorpusError(
            f"the Debian packages {' '.join(missing)} are not installed and this process cannot install "
            f"them; run: sudo apt-get install -y {' '.join(missing)}"
        )
    log(f"installing {' '.join(missing)} with apt-get (the corpus is Debian's manual pages)")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        log("apt-get install failed; running apt-get update and trying again")
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise CorpusError(f"apt-get install {' '.join(missing)} failed:\n{r.stderr[-2000:]}")


def package_pages(package: str, man_dir: str | None = None) -> list[Path]:
    """The manual pages a package ships (regular files; links are aliases) under
    /usr/share/man/man*/ (English), or /usr/share/man/`man_dir`/ for a translation (one package
    may ship several: manpages-zh holds zh_CN and zh_TW)."""
    r = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, check=True)
    prefix = f"/usr/share/man/{man_dir}/man" if man_dir else "/usr/share/man/man"
    pages = []
    for line in r.stdout.splitlines():
        p = Path(line)
        if line.startswith(prefix) and re.search(r"\.\d\w*(\.gz)?$", p.name) and p.is_file() \
                and not p.is_symlink():
            pages.append(p)
    return sorted(pages)


def is_alias(page: Path) -> bool:
    """A page whose source is only a `.so` include of another page."""
    import gzip

    opener = gzip.open if page.suffix == ".gz" else open
    with opener(page, "rt", encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f.read(4096).splitlines() if ln.strip() and not ln.startswith(('.\\"', "'\\\""))]
    return len(lines) <= 2 and any(ln.startswith(".so ") for ln in lines)


# --------------------------------------------------------------------------- rendering


def render(page: Path) -> str:
    """The page as plain UTF-8 text, 80 columns wide, as `man` shows it without formatting."""
    env = {**os.environ, "MANWIDTH": "80", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    man = subprocess.run(["man", "--nh", "--nj", "-E", "UTF-8", "-l", str(page)],
                         capture_output=True, env=env, timeout=120)
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, env=env, timeout=120)
    return col.stdout.decode("utf-8", errors="replace")


def sections(text: str) -> list[str]:
    """Top-level sections of a rendered page (heading + dedented body), header/footer lines dropped."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) < 3:
        return []
    lines = lines[1:-1]  # the "LS(1)  User Commands  LS(1)" header and the version/date footer
    out: list[list[str]] = []
    for ln in lines:
        if ln and not ln[0].isspace():
            out.append([ln])
        elif out:
            out[-1].append(ln)
    docs = []
    for sec in out:
        body = [ln for ln in sec[1:]]
        indents = [len(ln) - len(ln.lstrip()) for ln in body if ln.strip()]
        cut = min(indents) if indents else 0
        text = "\n".join([sec[0].strip()] + [ln[cut:] for ln in body])
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if text:
            docs.append(text)
    return docs


def documents(page_text: str, min_chars: int = MIN_SECTION_CHARS) -> list[str]:
    """A page's documents: its sections, each short one joined to the one after it."""
    docs, pending = [], ""
    for sec in sections(page_text):
        pending = f"{pending}\n\n{sec}" if pending else sec
        if len(pending) >= min_chars:
            docs.append(pending)
            pending = ""
    if pending:
        if docs:
            docs[-1] = f"{docs[-1]}\n\n{pending}"
        else:
            docs.append(pending)
    return docs


def is_heldout(page_name: str, heldout_pct: float) -> bool:
    """Whether a page is held out: a stable hash of its name, the same on every machine."""
    h = int.from_bytes(hashlib.sha1(page_name.encode()).digest()[:8], "little")
    return (h % 10_000) < heldout_pct * 100


# --------------------------------------------------------------------------- the corpus


@dataclass
class LanguageCorpus:
    """The files and counts of one language."""

    language: str
    train: Path
    heldout: Path
    packages: list[str]
    stats: dict = field(default_factory=dict)


def page_name(page: Path) -> str:
    name = page.name.removesuffix(".gz")
    return f"{page.parent.name}/{name}"  # e.g. man2/open.2 (the same name in both languages)


def _spread(items: list, n: int) -> list:
    """`n` items spread over `items` (not the first n: those would all be man1 pages)."""
    return items[:: max(1, len(items) // n)][:n] if n > 0 else []


def sample_pages(pages: list[Path], n: int, heldout_pct: float) -> list[Path]:
    """A spread-out sample of `n` pages with held-out pages (by the same hash of the name) in
    their share, at least one: a dozen pages picked blindly can hold out none."""
    held = [p for p in pages if is_heldout(page_name(p), heldout_pct)]
    rest = [p for p in pages if not is_heldout(page_name(p), heldout_pct)]
    n_held = min(len(held), max(1, round(n * heldout_pct / 100)))
    return sorted(_spread(held, n_held) + _spread(rest, n - n_held), key=page_name)


def build_language(language: str, out_dir: Path, *, max_pages: int | None, heldout_pct: float,
                   workers: int) -> LanguageCorpus:
    """Render, split, filter, deduplicate and write one language's train/heldout JSONL
    (`language`: en, or a code of `languages.TARGETS`)."""
    lang = None if language == "en" else languages.target(language)
    packages = list(ENGLISH_PACKAGES) if lang is None else [lang.package]
    ensure_packages(packages)
    man_dir = None if lang is None else lang.man_dir
    pages = sorted({p for pkg in packages for p in package_pages(pkg, man_dir)}, key=page_name)
    pages = [p for p in pages if not is_alias(p)]
    if max_pages is not None:
        pages = sample_pages(pages, max_pages, heldout_pct)
    if not pages:
        raise CorpusError(f"the packages {packages} hold no manual pages for {language}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        rendered = list(pool.map(render, pages))

    seen: set[str] = set()
    split = {"train": [], "heldout": []}
    counts = {"pages": len(pages), "empty_pages": 0, "duplicates": 0, "untranslated": 0}
    for page, text in zip(pages, rendered):
        docs = documents(text)
        if not docs:
            counts["empty_pages"] += 1
        part = "heldout" if is_heldout(page_name(page), heldout_pct) else "train"
        for doc in docs:
            if lang is not None and not languages.is_target_text(doc, lang):
                counts["untranslated"] += 1
                continue
            key = re.sub(r"\s+", " ", doc)
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            split[part].append(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, docs in split.items():
        paths[part] = out_dir / f"{language}.{part}.jsonl"
        with open(paths[part], "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        counts[f"{part}_docs"] = len(docs)
        counts[f"{part}_chars"] = sum(len(d) for d in docs)
        if not docs:
            raise CorpusError(f"{language}: no {part} document is left of {len(pages)} pages of {packages} "
                              f"({counts}); raise --set max_pages or heldout_pct")
    versions = {p: _version(p) for p in packages}
    stats = {**counts, "packages": versions, "filter": None if lang is None else languages.rule(lang)}
    return LanguageCorpus(language, paths["train"], paths["heldout"], packages, stats)


def _version(package: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return r.stdout.strip()


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build(out_dir: Path, target: str, *, max_pages: int | None = None, heldout_pct: float = 5.0,
          workers: int | None = None) -> dict[str, LanguageCorpus]:
    """English and `target` JSONL corpora under `out_dir`, reused when `corpus.json` says they
    were built with the same settings."""
    lang = languages.target(target)
    settings = {"max_pages": max_pages, "heldout_pct": heldout_pct, "min_section_chars": MIN_SECTION_CHARS,
                "target": target, "filter": languages.rule(lang),
                "packages": {"en": list(ENGLISH_PACKAGES), target: [lang.package]}}
    manifest = out_dir / "corpus.json"
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            log(f"corpus: reusing {out_dir}")
            return {code: LanguageCorpus(code, out_dir / c["train"], out_dir / c["heldout"], c["packages"], c["stats"])
                    for code, c in saved["languages"].items()}
    if shutil.which("man") is None or shutil.which("col") is None:
        raise CorpusError("rendering manual pages needs man-db and bsdextrautils: apt-get install -y man-db bsdextrautils")
    workers = workers or os.cpu_count() or 1
    corpora = {}
    for code in ("en", target):
        corpora[code] = build_language(code, out_dir, max_pages=max_pages, heldout_pct=heldout_pct, workers=workers)
        s = corpora[code].stats
        log(f"corpus {code}: {s['pages']} pages -> {s['train_docs']} train / {s['heldout_docs']} held-out "
            f"documents ({s['train_chars']:,} / {s['heldout_chars']:,} chars); dropped {s['duplicates']} duplicates"
            + (f", {s['untranslated']} mostly untranslated ({s['filter']})" if code != "en" else ""))
    manifest.write_text(json.dumps({
        "settings": settings,
        "languages": {code: {"train": c.train.name, "heldout": c.heldout.name, "packages": c.packages,
                             "stats": c.stats} for code, c in corpora.items()},
    }, indent=2, ensure_ascii=False))
    return corpora
