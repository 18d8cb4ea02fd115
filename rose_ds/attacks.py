"""Black-box text attacks that run offline: DeepWordBug-style character edits and PWWS-style synonym swaps.

Both attacks only query a classifier's output probabilities (any saved sequence-classification model,
through :class:`Victim`) and follow TextAttack's recipes of the same names, written here so that the
project does not depend on TextAttack (which does not install next to transformers 5):

* :func:`deepwordbug` (Gao et al., 2018): words ranked by how much deleting them lowers the true
  label's probability; in that order, each word gets the best of four random character edits
  (swap two neighbours, substitute, delete, insert) until the prediction flips or the Levenshtein
  distance between the attacked and the original text would exceed ``max_edit_distance`` (30, as
  TextAttack's recipe).
* :func:`pwws` (Ren et al., 2019): for every word, its best WordNet synonym (the one lowering the
  true label's probability most) and its saliency (the drop when the word is deleted); words are
  swapped in the order of softmax(saliency) x best drop until the prediction flips.

Both leave stop words (:data:`STOP_WORDS`) and words already changed untouched, and are deterministic:
the random edits of example ``i`` come from ``random.Random(f"{seed}:{i}")``, independent of batching.
Synonyms keep the part of speech of the word. No contextual tagger can be had offline (NLTK's and
spaCy's models are downloads), so a word's part of speech is its most frequent one in the SemCor
counts that ship with WordNet (a unigram tagger): "films" is a noun, "runs" a verb. Multi-word
WordNet lemmas are not used as substitutes.

WordNet 3.0 is read from Debian's ``wordnet-base`` package (``/usr/share/wordnet``, or the folder in
``$WNSEARCHDIR``) with NLTK's reader; :func:`load_wordnet` says what to install when it is missing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import string
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# NLTK's English stop-word list (179 words). Copied rather than loaded: NLTK ships it as data that must be
# downloaded, which these machines cannot do.
STOP_WORDS = frozenset(
    "i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him "
    "his himself she she's her hers herself it it's its itself they them their theirs themselves what which who "
    "whom this that that'll these those am is are was were be been being have has had having do does did doing "
    "a an the and but if or because as until while of at by for with about against between into through during "
    "before after above below to from up down in out on off over under again further then once here there when "
    "where why how all any both each few more most other some such no nor not only own same so than too very s t "
    "can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't "
    "doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't "
    "shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't".split()
)

# WordNet 3.0's lexicographer files, numbered 00-44; NLTK needs them as a `lexnames` file, which Debian's
# package does not ship (category: 1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_WORDNET_FILES = ("index.noun", "data.noun", "noun.exc", "index.verb", "data.verb", "verb.exc", "index.adj",
                  "data.adj", "adj.exc", "index.adv", "data.adv", "adv.exc", "index.sense", "cntlist.rev")  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def load_wordnet(source: str | os.PathLike | None = None, cache: str | os.PathLike | None = None):
    """NLTK's WordNet reader over a WordNet 3.0 database folder (default: ``$WNSEARCHDIR`` or Debian's).

    NLTK reads the database only from a folder that also holds a ``lexnames`` file, so the files are
    copied once into ``cache/corpora/wordnet`` (default cache ``~/.cache/rose_ds/nltk_data``, which is added
    to NLTK's data path: NLTK reads nothing outside it) with that file added.

    Raises:
        FileNotFoundError: the database is missing (the message says what to install).
    """
    source = Path(source or os.environ.get("WNSEARCHDIR") or "/usr/share/wordnet")
    missing = [f for f in _WORDNET_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet 3.0 database not found in {source} (no {missing[0]}); install it with `apt-get install "
            "wordnet-base wordnet-sense-index` (Debian/Ubuntu) or pass the folder holding index.noun, data.noun, ..."
        )
    root = Path(cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rose_ds" / "nltk_data")
    folder = root / "corpora" / "wordnet"
    if not (folder / "lexnames").is_file():
        partial = folder.with_name(f"wordnet.tmp-{os.getpid()}")
        partial.mkdir(parents=True, exist_ok=True)
        for name in _WORDNET_FILES:
            shutil.copyfile(source / name, partial / name)
        lines = [f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}" for i, name in enumerate(_LEXNAMES)]
        (partial / "lexnames").write_text("\n".join(lines) + "\n")
        try:
            partial.rename(folder)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(partial, ignore_errors=True)
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # NLTK refuses to read corpora outside its data path
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():  # "multilingual functions are not available": no Open Multilingual Wordnet
        warnings.simplefilter("ignore", UserWarning)
        return WordNetCorpusReader(str(folder), None)


class Synonyms:
    """Single-word WordNet synonyms of a word, with the word's most frequent part of speech kept."""

    def __init__(self, wordnet) -> None:
        self.wordnet = wordnet
        self._cache: dict[str, list[str]] = {}

    def part_of_speech(self, word: str) -> str | None:
        """The WordNet POS (n, v, a, r) whose senses of ``word`` are the most frequent in SemCor, or None."""
        best, best_count = None, -1
        for pos in ("n", "v", "a", "r"):
            synsets = self.wordnet.synsets(word, pos)
            if not synsets:
                continue
            lemma = self.wordnet.morphy(word, pos) or word
            count = sum(x.count() for s in synsets for x in s.lemmas() if x.name().lower() == lemma)
            if count > best_count:  # ties keep the earlier POS: nouns, then verbs, adjectives, adverbs
                best, best_count = pos, count
        return best

    def __call__(self, word: str) -> list[str]:
        key = word.lower()
        if key not in self._cache:
            pos = self.part_of_speech(key)
            found: set[str] = set()
            base = self.wordnet.morphy(key, pos) if pos is not None else None
            if pos is not None:
                for synset in self.wordnet.synsets(key, pos):  # for "a", NLTK includes adjective satellites
                    for lemma in synset.lemmas():
                        name = lemma.name()
                        if "_" not in name and "-" not in name and name.lower() not in (key, base) and name.isalpha():
                            found.add(name.lower())
            self._cache[key] = sorted(found)
        return [_match_case(word, s) for s in self._cache[key]]


def _match_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


class Victim:
    """A sequence classifier queried only through its output probabilities (counts the queries)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_length: int = 128, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.queries = 0

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str | tuple[str, str]]) -> torch.Tensor:
        """Softmax over the labels for each text (or text pair), float64 on the CPU, shape (len(texts), labels)."""
        self.queries += len(texts)
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            pairs = [t if isinstance(t, tuple) else (t,) for t in chunk]
            batch = self.tokenizer(*zip(*pairs), truncation=True, max_length=self.max_length, padding=True,
                                   return_tensors="pt").to(self.device)  # fmt: skip
            out.append(torch.softmax(self.model(**batch).logits.double(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


@dataclass
class AttackResult:
    """One attacked example. ``status``: skipped (already misclassified), succeeded or failed."""

    original: str
    perturbed: str
    label: int
    original_prediction: int
    perturbed_prediction: int
    status: str
    words_perturbed: int
    words: int
    queries: int
    edit_distance: int = 0
    changes: list[tuple[str, str]] = field(default_factory=list)


class _Text:
    """A text split into words and the separators between them, so single words can be replaced."""

    def __init__(self, text: str) -> None:
        self.pieces = re.split(r"([A-Za-z][A-Za-z'-]*)", text)  # odd positions hold the words

    @property
    def word_positions(self) -> list[int]:
        return list(range(1, len(self.pieces), 2))

    def with_word(self, position: int, word: str) -> str:
        pieces = list(self.pieces)
        pieces[position] = word
        return "".join(pieces)

    def __str__(self) -> str:
        return "".join(self.pieces)


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _candidates_positions(text: _Text, changed: set[int]) -> list[int]:
    return [p for p in text.word_positions
            if p not in changed and text.pieces[p].lower() not in STOP_WORDS and len(text.pieces[p]) > 1]  # fmt: skip


def _char_edits(word: str, rng: random.Random) -> list[str]:
    """DeepWordBug's four edits, each at one random position: swap neighbours, substitute, delete, insert."""
    letters = string.ascii_lowercase
    out = []
    if len(word) > 1:
        i = rng.randrange(len(word) - 1)
        out.append(word[:i] + word[i + 1] + word[i] + word[i + 2 :])
    i = rng.randrange(len(word))
    out.append(word[:i] + rng.choice(letters.replace(word[i].lower(), "")) + word[i + 1 :])
    if len(word) > 1:
        i = rng.randrange(len(word))
        out.append(word[:i] + word[i + 1 :])
    i = rng.randrange(len(word) + 1)
    out.append(word[:i] + rng.choice(letters) + word[i:])
    return [w for w in dict.fromkeys(out) if w != word]


def _deletion_saliency(victim: Victim, text: _Text, positions: list[int], label: int, p0: float):
    probs = victim.probabilities([text.with_word(p, "") for p in positions])
    return (p0 - probs[:, label]).tolist() if positions else []


def _start(victim: Victim, text: str, label: int) -> tuple[_Text, float, int, int]:
    before = victim.queries
    probs = victim.probabilities([text])[0]
    return _Text(text), float(probs[label]), int(probs.argmax()), before


def _result(victim, original, current, label, prediction0, prediction, changes, before, status=None, distance=0):
    words = len(_Text(original).word_positions)
    if status is None:
        status = "succeeded" if prediction != label else "failed"
    return AttackResult(original, str(current), label, prediction0, prediction, status, len(changes), words,
                        victim.queries - before, distance, changes)  # fmt: skip


def deepwordbug(victim: Victim, text: str, label: int, *, seed: int = 0, index: int = 0,
                max_edit_distance: int = 30) -> AttackResult:  # fmt: skip
    """Attack one text with character edits (see the module docstring); ``index`` seeds its random edits."""
    rng = random.Random(f"{seed}:{index}")
    current, p_label, prediction0, before = _start(victim, text, label)
    if prediction0 != label:
        return _result(victim, text, current, label, prediction0, prediction0, [], before, "skipped")
    positions = _candidates_positions(current, set())
    saliency = _deletion_saliency(victim, current, positions, label, p_label)
    order = [p for _, p in sorted(zip(saliency, positions), key=lambda sp: -sp[0])]
    changes, prediction, distance = [], prediction0, 0
    for position in order:
        word = current.pieces[position]
        edits = [e for e in _char_edits(word, rng) if distance + levenshtein(word, e) <= max_edit_distance]
        if not edits:
            continue
        probs = victim.probabilities([current.with_word(position, e) for e in edits])
        best = int(probs[:, label].argmin())
        current.pieces[position] = edits[best]
        changes.append((word, edits[best]))
        distance += levenshtein(word, edits[best])
        prediction = int(probs[best].argmax())
        if prediction != label:
            break
    return _result(victim, text, current, label, prediction0, prediction, changes, before, distance=distance)


def pwws(victim: Victim, text: str, label: int, *, synonyms: Callable[[str], list[str]], seed: int = 0,
         index: int = 0) -> AttackResult:  # fmt: skip
    """Attack one text with WordNet synonym swaps ordered by probability-weighted saliency (PWWS)."""
    del seed, index  # PWWS has no randomness; the arguments keep one signature for both attacks
    current, p_label, prediction0, before = _start(victim, text, label)
    if prediction0 != label:
        return _result(victim, text, current, label, prediction0, prediction0, [], before, "skipped")
    positions = [p for p in _candidates_positions(current, set()) if synonyms(current.pieces[p])]
    saliency = torch.tensor(_deletion_saliency(victim, current, positions, label, p_label), dtype=torch.float64)
    candidates = [(p, s) for p in positions for s in synonyms(current.pieces[p])]
    probs = victim.probabilities([current.with_word(p, s) for p, s in candidates]) if candidates else None
    best: dict[int, tuple[float, str]] = {}
    for (p, s), q in zip(candidates, probs if probs is not None else []):
        drop = p_label - float(q[label])
        if p not in best or drop > best[p][0]:
            best[p] = (drop, s)
    weights = torch.softmax(saliency, 0).tolist() if positions else []
    order = sorted(range(len(positions)), key=lambda i: -weights[i] * best[positions[i]][0])
    changes, prediction = [], prediction0
    for i in order:
        position = positions[i]
        word, substitute = current.pieces[position], best[position][1]
        current.pieces[position] = substitute
        changes.append((word, substitute))
        prediction = int(victim.probabilities([str(current)])[0].argmax())
        if prediction != label:
            break
    return _result(victim, text, current, label, prediction0, prediction, changes, before)


def summarize(results: Sequence[AttackResult]) -> dict[str, float]:
    """TextAttack's summary numbers: accuracy before and under attack, success rate, perturbed words, queries."""
    total = len(results)
    succeeded = [r for r in results if r.status == "succeeded"]
    failed = sum(r.status == "failed" for r in results)
    attacked = len(succeeded) + failed
    return {
        "examples": total,
        "original_accuracy": attacked / total if total else float("nan"),
        "accuracy_under_attack": failed / total if total else float("nan"),
        "attack_success_rate": len(succeeded) / attacked if attacked else float("nan"),
        "avg_perturbed_words": sum(r.words_perturbed for r in succeeded) / len(succeeded) if succeeded else 0.0,
        "avg_perturbed_word_fraction": (
            sum(r.words_perturbed / max(r.words, 1) for r in succeeded) / len(succeeded) if succeeded else 0.0
        ),  # fmt: skip
        "avg_queries": sum(r.queries for r in results) / total if total else 0.0,
    }


def run_attack(victim: Victim, attack: str, texts: Sequence[str], labels: Sequence[int], *, seed: int = 0,
               synonyms: Callable[[str], list[str]] | None = None, max_edit_distance: int = 30):  # fmt: skip
    """Attack every text; returns ``(summary, results as dicts)``.

    Raises:
        ValueError: an unknown attack name, or ``pwws`` without ``synonyms``.
    """
    if attack == "deepwordbug":
        one = lambda t, y, i: deepwordbug(victim, t, y, seed=seed, index=i, max_edit_distance=max_edit_distance)  # noqa: E731
    elif attack == "pwws":
        if synonyms is None:
            raise ValueError("the pwws attack needs synonyms=Synonyms(load_wordnet())")
        one = lambda t, y, i: pwws(victim, t, y, synonyms=synonyms, seed=seed, index=i)  # noqa: E731
    else:
        raise ValueError(f"unknown attack {attack!r}; use deepwordbug or pwws")
    results = [one(t, int(y), i) for i, (t, y) in enumerate(zip(texts, labels))]
    return summarize(results), [asdict(r) for r in results]
