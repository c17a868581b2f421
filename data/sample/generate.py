"""Deterministic generator for the shipped sample data (written for this project, no real Amazon text).

    python data/sample/generate.py            # rewrites data/sample/trn.json and data/sample/xauusd.csv

trn.json follows the AmazonTitles-1.3MM `trn.json` format exactly: one JSON object per line with
uid, title, content, target_ind, target_rel. Descriptions are built from the words of the title
(brand, material, colour, product type, size), so a model can learn to write them from the title.
The real file's quirks are reproduced on purpose so that cleaning is exercised: ~40% empty content,
a few empty titles, HTML entities (&#8217; &amp; &quot;), doubled whitespace, duplicate titles and a
few very long descriptions.

xauusd.csv is a synthetic gold (XAU/USD) headline table for the forecast task: the targets follow
from the headline's label and sentiment strength (plus noise), so the relation is learnable; a few
rows are malformed on purpose (unknown direction, non-numeric magnitude, missing value).
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

BRANDS = ["Acme", "Northwind", "Bluebird", "Everpeak", "Solace", "Kestrel", "Juniper", "Orchard", "Tidewater",
          "Granite &amp; Co", "Lumen", "Maple Lane", "Vantage", "Cedar", "Harbor", "Pinecrest", "Redwood", "Zephyr"]
COLORS = ["Black", "White", "Navy Blue", "Red", "Forest Green", "Grey", "Pink", "Yellow", "Brown", "Purple"]
SIZES = ["Small", "Medium", "Large", "X-Large", "Pack of 2", "Pack of 6", "12 oz", "1 Gallon", "King", "Queen"]

# category -> (product nouns, materials, use, feature phrases)
CATS = {
    "kitchen": (["Chef Knife", "Frying Pan", "Cutting Board", "Mixing Bowl Set", "Coffee Mug", "Tea Kettle"],
                ["stainless steel", "cast iron", "bamboo", "ceramic", "tempered glass"],
                "everyday cooking and serving",
                ["is dishwasher safe", "heats evenly", "has a comfortable non-slip handle", "resists stains and odors"]),
    "toys": (["Building Blocks", "Plush Bear", "Puzzle", "Toy Truck", "Doll House", "Kite"],
             ["non-toxic plastic", "soft polyester", "recycled cardboard", "solid wood"],
             "children ages 3 and up",
             ["encourages creative play", "has rounded safe edges", "comes with a storage bag", "is easy to clean"]),
    "clothing": (["T-Shirt", "Hoodie", "Running Shorts", "Rain Jacket", "Wool Socks", "Tutu Skirt"],
                 ["organic cotton", "merino wool", "breathable polyester", "soft fleece"],
                 "casual wear and outdoor activities",
                 ["is machine washable", "keeps its shape after washing", "has a tagless collar", "wicks moisture away"]),
    "books": (["Cookbook", "Travel Guide", "Mystery Novel", "Poetry Collection", "History of Rome", "Field Guide to Birds"],
              ["hardcover", "paperback", "spiral-bound", "illustrated"],
              "readers who enjoy a good story",
              ["includes a detailed index", "features full-color photographs", "is written in a clear style",
               "was praised by critics"]),
    "garden": (["Garden Hose", "Pruning Shears", "Raised Bed", "Watering Can", "Bird Feeder", "Plant Pot"],
               ["galvanized steel", "UV-resistant resin", "cedar wood", "terracotta"],
               "backyard gardens and patios",
               ["withstands rain and sun", "assembles without tools", "drains excess water", "is lightweight"]),
    "electronics": (["Bluetooth Speaker", "USB-C Charger", "Wireless Mouse", "Headphones", "Phone Case", "LED Desk Lamp"],
                    ["aluminum", "ABS plastic", "silicone", "matte polycarbonate"],
                    "home, office and travel",
                    ["charges fully in two hours", "pairs in seconds", "has a one-year warranty", "is compact and portable"]),
    "pets": (["Dog Leash", "Cat Scratcher", "Pet Bed", "Chew Toy", "Food Bowl", "Bird Cage"],
             ["nylon", "natural rubber", "sisal rope", "memory foam"],
             "dogs and cats of all sizes",
             ["is gentle on teeth", "is easy to wash", "does not slide on the floor", "lasts through rough play"]),
    "beauty": (["Face Cream", "Shampoo", "Lip Balm", "Hair Brush", "Nail Kit", "Body Lotion"],
               ["shea butter", "argan oil", "aloe vera", "natural bristle"],
               "daily self-care routines",
               ["is free of parabens", "absorbs quickly", "has a light fresh scent", "suits sensitive skin"]),
    "sports": (["Yoga Mat", "Water Bottle", "Jump Rope", "Dumbbell Set", "Tennis Racket", "Bike Helmet"],
               ["natural rubber", "BPA-free plastic", "steel", "carbon fiber"],
               "workouts at home or at the gym",
               ["offers a firm grip", "is sweat resistant", "is easy to carry", "meets safety standards"]),
    "office": (["Notebook", "Fountain Pen", "Desk Organizer", "Stapler", "Sticky Notes", "File Folder"],
               ["recycled paper", "brass", "walnut wood", "sturdy plastic"],
               "school, office and home use",
               ["keeps a tidy desk", "writes smoothly", "holds up to 50 sheets", "comes in a gift box"]),
    "automotive": (["Car Phone Mount", "Tire Inflator", "Seat Cover", "Floor Mats", "Jump Starter", "Wiper Blades"],
                   ["heavy-duty rubber", "leatherette", "aluminum alloy", "all-weather TPE"],
                   "cars, trucks and SUVs",
                   ["fits most vehicles", "installs in minutes", "resists wear and tear", "is easy to clean"]),
    "music": (["Acoustic Guitar", "Ukulele", "Guitar Strings", "Drum Sticks", "Harmonica", "Piano Songbook"],
              ["spruce top", "mahogany", "phosphor bronze", "hickory"],
              "beginners and experienced players",
              ["stays in tune", "produces a warm tone", "comes with a carrying bag", "is easy to play"]),
}
OPENERS = ["", "This ", "Our "]


def make_record(rng: random.Random, i: int) -> dict:
    cat = rng.choice(sorted(CATS))
    nouns, materials, use, feats = CATS[cat]
    brand, noun, color, material = rng.choice(BRANDS), rng.choice(nouns), rng.choice(COLORS), rng.choice(materials)
    size = rng.choice(SIZES)
    title = f"{brand} {noun}, {color}, {size}"
    if cat == "books":
        title = f"{noun}: {rng.choice(['A Complete Guide', 'Second Edition', 'U.S. Edition', 'Illustrated'])}"
        title += f" by {rng.choice(['Ana Silva', 'John Carter', 'Mei Chen', 'Luis Gomez', 'Sara O&#8217;Neil'])}"
    f1, f2 = rng.sample(feats, 2)
    content = (f"{rng.choice(OPENERS)}{brand} {noun.lower()} is made of {material} and comes in {color.lower()}. "
               f"Designed for {use}, it {f1} and {f2}.")
    if cat == "books":
        content = (f"This {material} {noun.lower()} is written for {use}. It {f1} and {f2}. "
                   f"A great gift for anyone interested in {noun.lower().split(' of ')[-1]}.")
    content = content[0].upper() + content[1:]
    if rng.random() < 0.25:
        content = content.replace("'", "&#8217;").replace(" and ", " &amp; ", 1)
    if rng.random() < 0.1:
        content = content.replace(". ", ".  \n ")  # messy whitespace, as scraped text has
    if rng.random() < 0.02:  # very long descriptions
        content = " ".join([content] * rng.randint(15, 30))
    if rng.random() < 0.40:
        content = ""
    if rng.random() < 0.03:
        title = ""
    n = rng.randint(1, 4)
    return {"uid": f"B{rng.randrange(10**8, 10**9):09d}{i % 10}",
            "title": title,
            "content": content,
            "target_ind": sorted(rng.sample(range(2_000_000), n)),
            "target_rel": [1.0] * n}


def make_trn(n: int = 1800, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    rows = [make_record(rng, i) for i in range(n)]
    for _ in range(40):  # duplicate titles, as the real file has
        src = rng.choice(rows)
        dup = dict(src, uid=f"B{rng.randrange(10**8, 10**9):09d}d")
        rows.insert(rng.randrange(len(rows)), dup)
    return rows


# ---------------------------------------------------------------- XAU/USD sample
EVENTS = [  # (headline template, label, base move for gold in %)
    ("Fed signals {adv} rate cuts as inflation cools", "bullish", 0.9),
    ("Dollar slides after {adv} weak jobs report", "bullish", 0.7),
    ("Geopolitical tensions {adv} escalate in the Middle East", "bullish", 1.1),
    ("Central banks {adv} increase gold purchases", "bullish", 0.6),
    ("Fed hints at {adv} higher rates for longer", "bearish", 0.8),
    ("Strong US retail sales {adv} lift the dollar", "bearish", 0.6),
    ("Treasury yields jump {adv} after hot CPI print", "bearish", 0.9),
    ("Risk appetite returns as stocks rally {adv}", "bearish", 0.4),
    ("Markets {adv} await central bank minutes", "neutral", 0.1),
    ("Gold trades in a {adv} narrow range ahead of holiday", "neutral", 0.05),
]
ADVERBS = {1: "slightly", 2: "modestly", 3: "clearly", 4: "sharply", 5: "dramatically"}
HORIZONS = ("6h", "12h", "24h", "48h")


def make_xau(n: int = 1200, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tmpl, label, base = rng.choice(EVENTS)
        strength = rng.randint(1, 5)
        row = {"generated_headline": tmpl.format(adv=ADVERBS[strength]).replace("  ", " "),
               "label": label, "sentiment_strength": strength,
               "explanation": f"{label.capitalize()} news for gold with strength {strength} of 5.",
               "symbol": "XAUUSD", "symbol_name": "Gold / US Dollar",
               "correlation_description": "Gold usually moves opposite to the US dollar and real yields."}
        for k, h in enumerate(HORIZONS):
            move = base * strength / 3 * (1 + 0.35 * k) * rng.uniform(0.8, 1.2)
            if label == "neutral" or move < 0.15:
                direction = "flat"
            else:
                direction = "up" if label == "bullish" else "down"
                if rng.random() < 0.08:  # markets are noisy
                    direction = "down" if direction == "up" else "up"
            row[f"direction_{h}"] = direction
            row[f"magnitude_{h}"] = f"{move:.2f}"
        rows.append(row)
    # malformed rows, as real exports have
    rows[10]["direction_6h"] = "sideways"
    rows[20]["magnitude_24h"] = "n/a"
    rows[30]["direction_48h"] = ""
    rows[40]["generated_headline"] = ""
    return rows


def main() -> None:
    with open(HERE / "trn.json", "w", encoding="utf-8", newline="\n") as f:
        for r in make_trn():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    xau = make_xau()
    with open(HERE / "xauusd.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(xau[0]))
        w.writeheader()
        w.writerows(xau)
    print(f"wrote {HERE / 'trn.json'} and {HERE / 'xauusd.csv'}")


if __name__ == "__main__":
    main()
