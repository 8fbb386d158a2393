"""Synthetic psgs_w100 at any size, streamed to disk: what the scale benchmark ingests when 21M real passages are
not at hand, never held in memory (5M passages are about 2.7 GB of TSV).

DPR's psgs_w100 cuts each Wikipedia article into 100-word windows; an article's last window is shorter. Here an
article has a geometric number of full windows (mean 12.5) and a last one of 1-99 words drawn uniformly, so about
7.5% of the passages are short; a title is 1-5 words. Words follow a Zipf(1.1) law over a 200,000-word vocabulary:
the ~190 commonest English words at the top ranks, then pronounceable pseudo-words built from syllables (short ones
frequent), with full stops, commas and the odd year. So the text compresses about as English does (gzip to 0.42 of
its size; psgs_w100.tsv.gz is 0.35) and a WordPiece tokenizer cuts it into pieces as it cuts real text, not `w123`
tokens: 550 bytes and a median of 180 MiniLM tokens a passage (psgs_w100: about 600 bytes, 140 tokens). Everything
is drawn from seeded generators: the same arguments write the same bytes.
"""

from __future__ import annotations

import csv
import functools
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

Row = tuple[str, str, str]  # (id, text, title): psgs_w100's columns in the order kit.corpora uses

# The most frequent English words hold the top ranks (a real text's commonest words are these).
COMMON_WORDS = tuple(
    dict.fromkeys(
        """the of and in to a was is for as on by with he that it at from his an were are which this be also or
        has had its first one their after new but who not they two have her she been other when there all during
        into school time may years more most only over city three up can many where team some then would these than
        year world used such between him later state both known national being under while same since each those
        people made through about well part called four five family number second season film war government
        around before area name including life series house king century back until university became began north
        south early high music album church another several game work group best based become found members town
        general county region public river against party local days home along major without last long line little
        named great main original released often still small large according within american english french german
        british district following led population west east born death however include power role career show
        single station history player""".split()
    )
)
# Syllables as English spells them most often: a plain consonant onset, one vowel, often no coda.
ONSETS = ",,,b,c,d,f,g,h,k,l,m,n,p,r,s,t,v,w,b,d,l,m,n,r,s,t,br,st,tr,ch,sh,th,pl,gr,cl".split(",")
VOWELS = "a,e,i,o,u,a,e,i,o,a,e,ea,ou,ai,y".split(",")
CODAS = ",,,,,,,n,r,s,l,m,t,d,n,r,s,nd,st,ng,ck".split(",")
FULL_WINDOWS_MEAN = 12.5  # an article's 100-word windows before its last, short one
WORDS = 100
CHUNK = 10_000  # passages drawn and written at a time


@functools.lru_cache(maxsize=2)
def vocabulary(size: int = 200_000, seed: int = 0) -> list[str]:
    """`size` distinct words by rank: the common English words, then pseudo-words of 1-4 syllables (more syllables
    at rarer ranks, as in real languages)."""
    rng = np.random.default_rng(seed)
    words, seen = list(COMMON_WORDS), set(COMMON_WORDS)
    while len(words) < size:
        batch = rng.integers(0, [len(ONSETS), len(VOWELS), len(CODAS)], size=(4096, 4, 3))
        extra = rng.random(4096) < 0.4
        for parts, more in zip(batch, extra):
            rank = len(words)
            syllables = 1 + int(rank > 2_000 or more) + int(rank > 50_000 and more)
            word = "".join(ONSETS[o] + VOWELS[v] + CODAS[c] for o, v, c in parts[:syllables])
            if word not in seen and len(words) < size:
                seen.add(word)
                words.append(word)
    return words


def zipf_cdf(size: int, exponent: float = 1.1) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    return np.cumsum(weights) / weights.sum()


class Words:
    """Draws words (Zipf over the vocabulary) with punctuation, for texts of given lengths."""

    def __init__(self, rng: np.random.Generator, size: int = 200_000, seed: int = 0):
        self.rng = rng
        self.vocabulary = np.array(vocabulary(size, seed), dtype=object)  # a copy: draws edit it
        self.cdf = zipf_cdf(size)

    def draw(self, count: int) -> list[str]:
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(count)), len(self.cdf) - 1)
        words = self.vocabulary[ranks]
        marks = self.rng.random(count)
        for at in np.flatnonzero(marks < 0.012):  # a year
            words[at] = str(int(1000 + (marks[at] * 1e9) % 1025))
        for at in np.flatnonzero((marks >= 0.012) & (marks < 0.06)):  # a comma
            words[at] = words[at] + ","
        for at in np.flatnonzero(marks >= 0.955):  # the end of a sentence, and the next one's capital
            words[at] = words[at] + "."
            if at + 1 < count:
                words[at + 1] = words[at + 1].capitalize()
        return words.tolist()

    def title(self) -> str:
        count = int(self.rng.integers(1, 6))
        ranks = self.rng.integers(len(COMMON_WORDS), min(len(self.cdf), 100_000), count)
        return " ".join(str(self.vocabulary[r]).capitalize() for r in ranks)


def passages(count: int, seed: int = 0, start_id: int = 1) -> Iterator[list[Row]]:
    """`count` passages in article order, ids `start_id`.., in lists of up to `CHUNK` rows."""
    rng = np.random.default_rng(seed)
    words = Words(rng)
    article_left, title, made = 0, "", 0
    while made < count:
        lengths, titles = [], []
        while len(lengths) < min(CHUNK, count - made):
            if article_left == 0:
                article_left, title = int(rng.geometric(1 / FULL_WINDOWS_MEAN)) + 1, words.title()
            article_left -= 1
            lengths.append(WORDS if article_left else int(rng.integers(1, WORDS)))
            titles.append(title)
        drawn = words.draw(sum(lengths))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        rows = [
            (str(start_id + made + i), " ".join(drawn[bounds[i] : bounds[i + 1]]), titles[i])
            for i in range(len(lengths))
        ]
        made += len(rows)
        yield rows


def tsv_line(row: Row) -> str:
    """One psgs_w100 line (kit.corpora.dpr_tsv's layout: the text always quoted, inner quotes doubled)."""
    pid, text, title = row
    return f'{pid}\t"{text.replace(chr(34), chr(34) * 2)}"\t{title}\n'


def write_tsv(path: Path, chunks: Iterator[list[Row]], sample_every: int = 0) -> list[Row]:
    """Stream `chunks` to a psgs_w100 TSV at `path`; every `sample_every`-th row is returned (0: none)."""
    sampled: list[Row] = []
    seen = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write("id\ttext\ttitle\n")
        for rows in chunks:
            out.write("".join(map(tsv_line, rows)))
            if sample_every:
                sampled += [row for i, row in enumerate(rows, start=seen) if i % sample_every == 0]
            seen += len(rows)
    return sampled


def read_tsv(path: Path) -> Iterator[Row]:
    """The rows of a psgs_w100 TSV, one at a time (csv as DPR reads it)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)
        for pid, text, title in reader:  # noqa: UP028 - three columns, or the unpacking says what is wrong
            yield pid, text, title


def next_night(
    source: Path,
    target: Path,
    count: int,
    next_id: int,
    night: int,
    changed: float = 0.01,
    mix: tuple[float, float] = (0.4, 0.3),
    seed: int = 0,
) -> dict[str, int]:
    """Stream `source` (of `count` rows) to `target` with `changed` x count passages touched, as
    `benchmarks.nightly.next_night` does but never holding the rows: edit `mix[0]` of them (their last 10 words
    redrawn), delete `mix[1]` and add the rest (new articles' passages, ids from `next_id`, each after a row drawn
    at random); positions are drawn uniformly over the corpus, deterministic per night."""
    n = max(3, int(count * changed))
    edited, deleted = int(n * mix[0]), int(n * mix[1])
    added = n - edited - deleted
    rng = np.random.default_rng([seed, night])
    positions = rng.choice(count, size=n, replace=False)
    edit_at, delete_at = set(positions[:edited].tolist()), set(positions[edited : edited + deleted].tolist())
    add_after = sorted(positions[edited + deleted :].tolist())
    new_rows = itertools.chain.from_iterable(passages(added, seed=seed + 1000 + night, start_id=next_id))
    words = Words(np.random.default_rng([seed, night, 1]))
    pending = iter(add_after)
    insert_at = next(pending, None)
    with open(target, "w", encoding="utf-8", newline="") as out:
        out.write("id\ttext\ttitle\n")
        for i, (pid, text, title) in enumerate(read_tsv(source)):
            if i in edit_at:
                kept = text.split()
                text = " ".join(kept[: max(0, len(kept) - 10)] + words.draw(min(10, len(kept))))
            if i not in delete_at:
                out.write(tsv_line((pid, text, title)))
            while insert_at == i:
                out.write(tsv_line(next(new_rows)))
                insert_at = next(pending, None)
    return {"edited": edited, "deleted": deleted, "added": added}
