"""The 40 CelebA attribute names, in the order of list_attr_celeba.txt, and name checks."""

from __future__ import annotations

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

ATTRIBUTE_INDEX: dict[str, int] = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}

# The official partition codes in list_eval_partition.txt.
SPLITS: tuple[str, ...] = ("train", "val", "test")


def attribute_index(name: str) -> int:
    """Index of an attribute in CelebA order; unknown names are refused with the valid list."""
    try:
        return ATTRIBUTE_INDEX[name]
    except KeyError:
        valid = ", ".join(CELEBA_ATTRIBUTES)
        raise ValueError(f"unknown CelebA attribute {name!r}; valid names: {valid}") from None
