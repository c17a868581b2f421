"""Deterministic generator of the shipped preference sample (synthetic, written for this project; CC0).

    python data/sample/generate_pairs.py          # rewrites data/sample/pairs.jsonl from data/sample/trn.json

pairs.jsonl is TRL's conversational preference format (one {"prompt": [user turn], "chosen": [assistant turn],
"rejected": [assistant turn]} per line). The prompt asks for a product description exactly as the smollm2 recipe
does ("Write the product description for this title.\\nTitle: {title}"); the chosen answer is the description of a
trn.json record (HTML entities and whitespace cleaned); the rejected answer has a fault a shopper would not want:
it contradicts the title (another colour, brand or pack size swapped in), names a material the product is never
made of, describes another product, or degenerates into repetition. One prompt has one to three pairs, each with a
different fault, so a split by pair would leak prompts. About 3% of the rows carry faults on purpose (identical
sides, an empty side, a repeated pair) so that cleaning is exercised; --clean leaves them out.
"""
from __future__ import annotations

import argparse
import html
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASK = "Write the product description for this title.\nTitle: {title}"
BRANDS = ["Acme", "Northwind", "Bluebird", "Everpeak", "Solace", "Kestrel", "Juniper", "Orchard", "Tidewater",
          "Granite & Co", "Lumen", "Maple Lane", "Vantage", "Cedar", "Harbor", "Pinecrest", "Redwood", "Zephyr"]
MADE_OF = re.compile(r"is made of (.+?) (?:and|&) comes in (.+?)\.")
FAULTS = ("colour", "brand", "material", "product", "repetition", "size")


def clean(s: str) -> str:
    for _ in range(2):
        s = html.unescape(s)
    return re.sub(r"\s+", " ", s).strip()


def products(path: Path) -> list[dict]:
    """trn.json records usable as chosen answers (as the smollm2 recipe cleans them), first of each title."""
    out, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        title, content = clean(rec["title"]), clean(rec["content"])
        if len(title) < 3 or not 20 <= len(content) <= 1000 or title.lower() in seen:
            continue
        seen.add(title.lower())
        parts = title.split(", ")
        brand = next((b for b in BRANDS if title.startswith(b + " ")), None)
        m = MADE_OF.search(content)
        if len(parts) == 3 and brand and m:
            p = {"title": title, "content": content, "brand": brand, "noun": parts[0][len(brand) + 1:],
                 "colour": parts[1], "size": parts[2], "material": m.group(1)}
        else:  # a book: no brand, colour or material in its title
            p = {"title": title, "content": content, "noun": title.split(":")[0]}
        out.append(p)
    return out


def swap(text: str, old: str, new: str) -> str:
    return re.sub(re.escape(old), new, text, count=1, flags=re.IGNORECASE)


def rejected(rng: random.Random, p: dict, fault: str, every: list[dict], made_of: dict) -> str | None:
    """The description with `fault`, or None when the fault does not apply to this product."""
    c = p["content"]
    if fault == "colour" and "colour" in p:
        other = rng.choice(sorted({q["colour"] for q in every if "colour" in q} - {p["colour"]}))
        return swap(c, f"comes in {p['colour']}", f"comes in {other.lower()}")
    if fault == "brand" and "brand" in p and p["brand"] in c:
        return c.replace(p["brand"], rng.choice([b for b in BRANDS if b != p["brand"]]), 1)
    if fault == "material" and "material" in p:
        never = sorted({q["material"] for q in every if "material" in q} - made_of[p["noun"]])
        return c.replace(f"made of {p['material']}", f"made of {rng.choice(never)}", 1)
    if fault == "size" and "colour" in p and (m := re.fullmatch(r"Pack of (\d+)", p["size"])):
        other = rng.choice([n for n in ("2", "3", "4", "6", "10", "12") if n != m.group(1)])
        return swap(c, f"comes in {p['colour']}", f"comes in {p['colour'].lower()} as a pack of {other}")
    if fault == "product":
        return rng.choice([q for q in every if q["noun"] != p["noun"]])["content"]
    if fault == "repetition":
        first = c.split(". ")[0].rstrip(".") + "."
        words = " ".join([first] * 8).split()
        return " ".join(words[: max(len(c.split()), len(first.split()) + 4)])
    return None


def pairs(n: int, clean_only: bool, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    every = products(HERE / "trn.json")
    made_of: dict[str, set] = {}
    for q in every:
        if "material" in q:
            made_of.setdefault(q["noun"], set()).add(q["material"])
    order = every[:]
    rng.shuffle(order)
    rows: list[dict] = []
    for p in order:
        if len(rows) >= n:
            break
        want = rng.choice((1, 1, 2, 2, 3))
        prompt = [{"role": "user", "content": ASK.format(title=p["title"])}]
        made = 0
        for f in rng.sample(FAULTS, len(FAULTS)):
            if made == want or len(rows) >= n:
                break
            r = rejected(rng, p, f, every, made_of)
            if r and r != p["content"]:
                rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": p["content"]}],
                             "rejected": [{"role": "assistant", "content": r}]})
                made += 1
    if not clean_only:  # the faults real preference exports have, each dropped by prepare with its line
        picked = rng.sample(range(len(rows)), 18)
        for k, i in sorted(enumerate(picked), key=lambda x: -x[1]):  # from the end: an insert moves no picked row
            kind = k % 3
            if kind == 0:
                rows[i] = {**rows[i], "rejected": rows[i]["chosen"]}  # identical sides
            elif kind == 1:
                rows[i] = {**rows[i], "rejected": [{"role": "assistant", "content": ""}]}  # an empty side
            else:
                rows.insert(i + 1, rows[i])  # the same pair twice
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="pairs before the faulty rows")
    ap.add_argument("--clean", action="store_true", help="no faulty rows")
    ap.add_argument("--out", type=Path, default=HERE / "pairs.jsonl")
    a = ap.parse_args(argv)
    rows = pairs(a.n, a.clean)
    with open(a.out, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"wrote {len(rows)} pairs to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
