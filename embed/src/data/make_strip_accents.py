"""Writes strip_accents.tsv: what BERT's accent stripping (NFD, then drop the
nonspacing marks, category Mn) makes of each character it changes, from
Python's Unicode database. One line a character: its code point, a tab, and
the code points it becomes (none when it is dropped), all in hex. Hangul
syllables are left out: the tokenizer decomposes them by the Unicode
algorithm.

    python3 embed/src/data/make_strip_accents.py
"""

import os
import unicodedata

out = os.path.join(os.path.dirname(__file__), "strip_accents.tsv")
lines = [f"# Unicode {unicodedata.unidata_version}; made by make_strip_accents.py"]
for cp in range(0x110000):
    if 0xD800 <= cp <= 0xDFFF or 0xAC00 <= cp <= 0xD7A3:
        continue
    ch = chr(cp)
    nfd = unicodedata.normalize("NFD", ch)
    kept = "".join(c for c in nfd if unicodedata.category(c) != "Mn")
    if kept != ch:
        lines.append(f"{cp:X}\t" + " ".join(f"{ord(c):X}" for c in kept))
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
