"""Deterministic generator of the shipped conversation sample (synthetic, written for this project; CC0).

    python data/sample/generate_chat.py                                  # rewrites data/sample/chat.jsonl
    python data/sample/generate_chat.py --n 1000000 --exchanges 3 --clean --out /tmp/chat-1m.jsonl   # benchmark file

chat.jsonl is OpenAI messages format (one {"messages": [{role, content}, ...]} per line): a support assistant of
a fictional outdoor shop answers 1-3 questions per conversation (order status, store hours, shipping, returns,
sizing). Answers follow rules from the question's own words (an order number's last digit decides its status, a
city its hours, a height its size), so a model can learn them and a retrieval baseline cannot copy them. About 4%
of the rows carry the faults real chat exports have, so cleaning is exercised: duplicates, a conversation ending on
a user turn, two user turns in a row, an empty answer, an unknown role. --clean leaves them out.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "You are the support assistant of Trailhead Outfitters. Answer in one or two short sentences."
CITIES = {"Denver": "9am to 8pm", "Portland": "10am to 7pm", "Boise": "8am to 6pm", "Austin": "9am to 9pm",
          "Seattle": "10am to 8pm", "Tucson": "7am to 5pm", "Madison": "9am to 7pm", "Reno": "10am to 6pm"}
COUNTRIES = {"Canada": ("$12", "5"), "Mexico": ("$15", "7"), "Germany": ("$25", "9"), "Japan": ("$30", "10"),
             "Brazil": ("$28", "12"), "Australia": ("$32", "11"), "France": ("$25", "9"), "Chile": ("$27", "12")}
PRODUCTS = ["rain jacket", "hiking boots", "sleeping bag", "day pack", "fleece vest", "trekking poles", "tent",
            "down parka", "trail runners", "camp stove"]
STATUS = ["is being packed and ships tomorrow", "shipped yesterday and arrives in 3 days",
          "is out for delivery today", "was delivered to your front door", "is waiting for a restock of one item"]


def order(rng: random.Random) -> tuple[str, str]:
    num = f"TO-{rng.randint(10000, 99999)}"
    ask = rng.choice(["Where is my order {n}?", "Can you check the status of order {n}?", "Any news on order {n}?"])
    return ask.format(n=num), f"Order {num} {STATUS[int(num[-1]) % len(STATUS)]}."


def hours(rng: random.Random) -> tuple[str, str]:
    city = rng.choice(list(CITIES))
    ask = rng.choice(["What are your opening hours in {c}?", "When is the {c} store open?", "Is the {c} shop open late?"])
    return ask.format(c=city), f"Our {city} store is open {CITIES[city]} every day."


def shipping(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(list(COUNTRIES))
    price, days = COUNTRIES[country]
    ask = rng.choice(["How much is shipping to {c}?", "Do you ship to {c}, and what does it cost?",
                      "What does delivery to {c} cost?"])
    return ask.format(c=country), f"Shipping to {country} costs {price} and takes about {days} business days."


def returns(rng: random.Random) -> tuple[str, str]:
    product, days = rng.choice(PRODUCTS), rng.randint(2, 60)
    ask = f"Can I return the {product} I bought {days} days ago?"
    if days <= 30:
        return ask, f"Yes, the {product} is within our 30-day return window; start the return from your account page."
    return ask, f"Sorry, the {product} is past our 30-day return window, but we can still repair it under warranty."


def sizing(rng: random.Random) -> tuple[str, str]:
    product, height = rng.choice(PRODUCTS[:5]), rng.randint(150, 200)
    size = "small" if height < 165 else "medium" if height < 180 else "large"
    return f"Which size of the {product} fits someone {height} cm tall?", f"For {height} cm we recommend the {size} {product}."


TOPICS = (order, hours, shipping, returns, sizing)


def conversation(rng: random.Random, exchanges: int) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for k in range(exchanges):
        q, a = rng.choice(TOPICS)(rng)
        msgs += [{"role": "user", "content": q if k == 0 else f"Thanks. {q}"}, {"role": "assistant", "content": a}]
    return msgs


def faulty(rng: random.Random, msgs: list[dict], kind: int) -> list[dict]:
    """One of the faults real exports have (cleaning repairs or drops each)."""
    msgs = [dict(m) for m in msgs]
    if kind == 0:
        return msgs + [{"role": "user", "content": "Thanks, bye!"}]  # ends on a user turn: the turn is removed
    if kind == 1:
        i = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        return msgs[: i + 1] + [{"role": "user", "content": "Hello?"}] + msgs[i + 1:]  # two user turns: merged
    if kind == 2:
        msgs[-1]["content"] = ""  # an empty answer: dropped
        return msgs
    return msgs + [{"role": "narrator", "content": "The customer leaves."}]  # an unknown role: dropped


def rows(n: int, exchanges: int | None, clean: bool, seed: int = 7):
    rng = random.Random(seed)
    previous = None
    for _ in range(n):
        msgs = conversation(rng, exchanges or rng.choice((1, 1, 2, 3)))
        if not clean and previous and rng.random() < 0.01:
            msgs = previous  # a duplicate row
        elif not clean and rng.random() < 0.03:
            msgs = faulty(rng, msgs, rng.randrange(4))
        previous = msgs
        yield {"messages": msgs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=360)
    ap.add_argument("--exchanges", type=int, help="user/assistant pairs per conversation (default: 1-3)")
    ap.add_argument("--clean", action="store_true", help="no faulty rows")
    ap.add_argument("--out", type=Path, default=HERE / "chat.jsonl")
    a = ap.parse_args(argv)
    with open(a.out, "w", encoding="utf-8") as f:
        for r in rows(a.n, a.exchanges, a.clean):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {a.n} conversations to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
