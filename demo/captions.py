"""The demo world's alt-texts: clean captions (`caption_for`), weak ones that say little (`weak_caption_for`,
web world), and the words of its noisy kinds (boilerplate strings, non-English templates, SEO filler, junk
tokens)."""

from __future__ import annotations

import random
import re

from demo.draw import COUNT_WORDS, PLURAL

BOILERPLATE = ["image", "IMG_2041.JPG", "click to enlarge", "1920x1080", "alt_img", "untitled",
               "Photo", "thumbnail image", "DSC00417.jpg", "no description available"]
NON_ENGLISH = {
    "fr": ["un {c} {s} sur un fond blanc", "photo d'un {s} {c} dessiné à la main"],
    "de": ["ein {c} {s} auf weißem Hintergrund", "Foto von einem {c} {s} aus Papier"],
    "es": ["un {s} de color {c} sobre fondo blanco", "foto de un {s} {c} hecho a mano"],
    "it": ["un {s} {c} su sfondo bianco", "foto di un {s} {c} disegnato a mano"],
}
# translated shape/colour words for the non-English captions (a small glossary is enough for a demo)
TRANSLATED = {
    "fr": ({"circle": "cercle", "square": "carré", "star": "étoile"}, {"red": "rouge", "blue": "bleu"}),
    "de": ({"circle": "Kreis", "square": "Quadrat", "star": "Stern"}, {"red": "roter", "blue": "blauer"}),
    "es": ({"circle": "círculo", "square": "cuadrado", "star": "estrella"}, {"red": "rojo", "blue": "azul"}),
    "it": ({"circle": "cerchio", "square": "quadrato", "star": "stella"}, {"red": "rosso", "blue": "blu"}),
}


# Alt-text as people and CMSs write it: a description of shape, colour and count, dressed with the words
# real alt-texts carry. Enough slots that two images rarely share a caption by chance (real boilerplate is
# the exception the align stage must find, not clean captions of popular concepts).
TEMPLATES = [
    "{pre}{count} {size}{colour} {shapes} on a {texture} {bg} background{post}",
    "{pre}{count} {size}{colour} {shapes} drawn on {texture} {bg} paper{post}",
    "{Colour} {shape} icon, {style} vector illustration on {bg}{post}",
    "{pre}a {size}{style} {colour} {shape} shape{post}",
    "close-up of {count} {size}{colour} {shape} {obj} on {bg} card{post}",
    "hand drawn {count} {colour} {shapes} isolated on {texture} {bg}{post}",
    "{pre}{count} {colour} {shapes} in a row on a {bg} wall{post}",
    "the {size}{colour} {shape} logo printed on {texture} {bg} fabric{post}",
    "cut-out paper {shapes} in {colour} on {bg}, {style} craft project for kids",
    "{pre}{count} {style} {colour} {shape} {obj} on a {texture} {bg} table{post}",
]
PREFIXES = ["", "", "", "photo of ", "picture of ", "image of ", "illustration of ", "drawing of ", "a photo of ",
            "stock photo of "]
SUFFIXES = ["", "", "", "", " - stock image", " | free clipart", ", high resolution", " for print", " (detail)",
            " in the center", " in the corner", " from above"]
SIZES = ["", "", "small ", "large ", "big ", "little ", "tiny ", "medium ", "bright ", "bold "]
STYLES = ["flat", "simple", "minimal", "modern", "retro", "cute", "classic", "colourful", "geometric", "plain"]
OBJECTS = ["sticker", "magnet", "badge", "button", "token", "coaster", "patch", "tile", "card", "decal"]
PLURAL_OBJ = {o: o + ("es" if o.endswith("ch") else "s") for o in OBJECTS}
TEXTURE_WORDS = {"plain": "plain", "striped": "striped", "dotted": "dotted", "gradient": "shaded",
                 "checked": "checkered", "noisy": "grainy"}
LONG_FILLER = ["best", "free", "download", "hd", "wallpaper", "cheap", "buy", "online", "sale", "new", "top",
               "quality", "vector", "clipart", "png", "icon", "design", "art", "print", "poster", "shop", "deal"]
JUNK = ["sku-88213", "zx9qv", "b7f3k2", "ref#4471x", "qqpzl", "x7y8z9w", "jjkkqq", "id_99821a", "wpx-00417", "zzkq8"]


def caption_for(shape: str, colour: str, count: int, bg: str, texture: str, rng: random.Random,
                min_words: int = 0) -> str:
    """An alt-text for the image; `min_words` asks for at least that many words (near-duplicates)."""
    while True:
        singular = count == 1
        text = rng.choice(TEMPLATES).format(
            pre=rng.choice(PREFIXES), post=rng.choice(SUFFIXES), size=rng.choice(SIZES), style=rng.choice(STYLES),
            obj=rng.choice(OBJECTS) if singular else PLURAL_OBJ[rng.choice(OBJECTS)],
            count="a" if singular else COUNT_WORDS[count], colour=colour, Colour=colour.capitalize(), shape=shape,
            shapes=shape if singular else PLURAL[shape], bg=bg, texture=TEXTURE_WORDS[texture],
        )
        text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
        text = (text[0].upper() + text[1:]) if rng.random() < 0.3 else text
        if len(text.split()) >= min_words:
            return text


# Weak alt-text (the web world): true of the picture but saying little about it. The slots are common English
# words (wordfreq knows them: align's rare-token rule passes them) and the combinations many, so a caption is
# written afresh for each image and no rule for repeated alt-text catches it; only a CLIP score can.
WEAK_SEO = [
    "{adj} {item} for your {place}, {cta}",
    "{cta}: {adj} {item} at a great price",
    "our {adj} {item} collection, new this {season}",
    "{adj} {item} ideas for the {place}",
    "{item} for every {place}, {adj} and {adj2}",
]
WEAK_BACKGROUND = [
    "{texture} {bg} background{post}",
    "a {texture} {bg} backdrop for {use}",
    "close-up of a {texture} {bg} surface",
    "{bg} paper with a {texture} pattern{post}",
]
WEAK_COLOUR = [
    "shades of {colour} for {use}",
    "a touch of {colour} for your {place}",
    "{colour} is the colour of the {season}",
    "bright {colour} tones, {adj} and {adj2}",
    "the colour {colour} on {bg}",
]
WEAK_GENERIC = [
    "{count} simple {things} on a page",
    "a {adj} {style} graphic for {use}",
    "{style} design for {use}, {cta}",
    "a simple picture for {use}",
    "{count} {things} in a {style} style",
]
WEAK_SLOTS = {
    "adj": ["beautiful", "simple", "modern", "elegant", "cheap", "quality", "handmade", "lovely", "unique", "classic",
            "stylish", "affordable", "cute", "fresh"],
    "item": ["wall art", "home decor", "gift ideas", "party supplies", "craft supplies", "print designs", "posters",
             "greeting cards", "sticker packs", "school supplies", "office decor", "room decor", "gift wrap"],
    "place": ["living room", "bedroom", "office", "classroom", "kitchen", "nursery", "studio", "shop", "website",
              "blog", "home", "party"],
    "cta": ["shop now", "free shipping", "order today", "see more", "buy online", "learn more", "find out more",
            "available now", "save today"],
    "season": ["spring", "summer", "autumn", "winter", "season", "week", "month", "year"],
    "use": ["a school project", "your presentation", "a blog post", "kids crafts", "a birthday card",
            "print and web", "social media", "a poster", "your next project", "the holidays"],
    "post": ["", "", " texture", ", close up", " for your design", ", plain and simple", " pattern"],
}


def weak_caption_for(shape: str, colour: str, count: int, bg: str, texture: str, rng: random.Random) -> str:
    """A weakly aligned alt-text for the image: true, but never naming its shape (SEO phrase, background only,
    colour only, or "some shapes")."""
    del shape  # what makes it weak: the caption never says what the picture is of
    slot = {k: rng.choice(v) for k, v in WEAK_SLOTS.items()}
    slot["adj2"] = rng.choice([a for a in WEAK_SLOTS["adj"] if a != slot["adj"]])
    group = rng.choices([WEAK_SEO, WEAK_BACKGROUND, WEAK_COLOUR, WEAK_GENERIC], weights=[0.35, 0.25, 0.2, 0.2])[0]
    text = rng.choice(group).format(
        **slot, bg=bg, texture=TEXTURE_WORDS[texture], colour=colour, style=rng.choice(STYLES),
        count="one" if count == 1 else COUNT_WORDS[count], things="shape" if count == 1 else "shapes")
    text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
    return (text[0].upper() + text[1:]) if rng.random() < 0.3 else text



# Paraphrases (semantic duplicates, web world): another wording of the same content. Each phrase of the clean
# templates that is not the picture's content (framing, size and style words, objects, textures, the background's
# wording, suffixes) has two rewordings; the shape, the colour and the background's colour stay. Every rewording
# is common English (wordfreq Zipf >= 1.8: align's rare-token rule passes it).
PARAPHRASES = {
    "stock photo of": ["stock image of", "royalty free picture of"], "a photo of": ["a photograph of", "a snapshot of"],
    "photo of": ["photograph of", "snapshot of"], "picture of": ["image showing", "a picture showing"],
    "image of": ["picture showing", "a view of"], "illustration of": ["artwork of", "an illustration showing"],
    "drawing of": ["sketch of", "a drawing showing"], "close-up of": ["detail shot of", "macro view of"],
    "hand drawn": ["sketched by hand", "drawn by hand"], "cut-out paper": ["paper cutout", "paper cut outs of"],
    "craft project for kids": ["craft idea for children", "children's craft activity"],
    "vector illustration": ["vector graphic", "vector artwork"], "icon": ["symbol", "sign"],
    "logo": ["emblem", "badge design"], "printed on": ["stamped on", "screen printed on"],
    "isolated on": ["set against", "cut out on"], "in a row": ["lined up", "side by side"],
    "drawn on": ["sketched on", "painted on"], "background": ["backdrop", "backing"],
    "paper": ["sheet", "card stock"], "fabric": ["cloth", "textile"], "table": ["tabletop", "desk"],
    "wall": ["wall surface", "painted wall"], "card": ["cardboard", "card stock"], "shape": ["form", "figure"],
    "small": ["little", "smallish"], "little": ["small", "wee"], "large": ["big", "sizeable"],
    "big": ["large", "huge"], "tiny": ["very small", "miniature"], "medium": ["mid sized", "medium sized"],
    "bright": ["vivid", "brilliant"], "bold": ["strong", "striking"], "flat": ["two dimensional", "flat style"],
    "simple": ["basic", "uncomplicated"], "minimal": ["minimalist", "sparse"], "modern": ["contemporary", "new style"],
    "retro": ["vintage", "old school"], "cute": ["adorable", "sweet"], "classic": ["traditional", "timeless"],
    "colourful": ["vibrant", "multicoloured"], "geometric": ["geometrical", "angular"], "plain": ["solid", "blank"],
    "sticker": ["label", "vinyl sticker"], "stickers": ["labels", "vinyl stickers"],
    "magnet": ["fridge magnet", "refrigerator magnet"], "magnets": ["fridge magnets", "refrigerator magnets"],
    "badge": ["pin", "lapel pin"], "badges": ["pins", "lapel pins"], "button": ["pin button", "round button"],
    "buttons": ["pin buttons", "round buttons"], "token": ["coin", "game token"], "tokens": ["coins", "game tokens"],
    "coaster": ["drink mat", "drinks coaster"], "coasters": ["drink mats", "drinks coasters"],
    "patch": ["sew on patch", "iron on patch"], "patches": ["sew on patches", "iron on patches"],
    "tile": ["ceramic tile", "mosaic tile"], "tiles": ["ceramic tiles", "mosaic tiles"],
    "cards": ["postcards", "greeting cards"], "decal": ["transfer", "vinyl decal"],
    "decals": ["transfers", "vinyl decals"],
    "striped": ["stripy", "lined"], "dotted": ["spotted", "polka dot"], "shaded": ["gradient", "graded"],
    "checkered": ["chequered", "checked"], "grainy": ["speckled", "noisy"],
    "stock image": ["stock picture", "stock photograph"], "free clipart": ["free clip art", "clip art for free"],
    "high resolution": ["hi res", "in high definition"], "for print": ["for printing", "print ready"],
    "detail": ["close view", "cropped"], "in the center": ["in the middle", "centred"],
    "in the corner": ["in a corner", "off to one side"], "from above": ["seen from above", "top view"],
    "two": ["2", "a pair of"], "three": ["3", "a trio of"], "four": ["4", "a set of four"],
    "light grey": ["light gray", "pale grey"], "pale blue": ["light blue", "soft blue"], "mint": ["mint green"],
}
_PARAPHRASE_RE = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in sorted(PARAPHRASES, key=len, reverse=True))
                            + r")\b", re.IGNORECASE)


def paraphrase(caption: str, rng: random.Random, max_words: int = 20) -> str:
    """The caption in other words: every phrase of PARAPHRASES it holds reworded (longest first, once each),
    articles agreed again, its first letter's case kept. What it says of the picture (shape, colour, count,
    background) is unchanged; its words are not, so MinHash over word sets (align's near_duplicate, Jaccard 0.8)
    finds too few in common (tests/test_world_semantic.py measures it). Rewordings are drawn again while the
    result has over `max_words` words (align's too_many_words must not be what catches it)."""
    for _try in range(20):
        text = _PARAPHRASE_RE.sub(lambda m: rng.choice(PARAPHRASES[m.group(0).lower()]), caption)
        if len(re.findall(r"\w+(?:['’]\w+)*", text)) <= max_words:
            break
    if text.lower() == caption.lower():  # no phrase to reword (the clean templates always hold one)
        text = f"{rng.choice(['picture', 'image', 'photo'])} showing {caption[0].lower()}{caption[1:]}"
    text = re.sub(r"\b([Aa])n? ([A-Za-z0-9])",
                  lambda m: m.group(1) + ("n" if m.group(2).lower() in "aeiou" else "") + " " + m.group(2), text)
    return (text[0].upper() + text[1:]) if caption[:1].isupper() else (text[0].lower() + text[1:])
