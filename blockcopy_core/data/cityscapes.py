"""Cityscapes video names and clip paths, shared by the framework plugins (no framework imports).

Cityscapes ships its video as 30-frame snippets at 17 Hz in ``leftImg8bit_sequence`` (from
``leftImg8bit_sequence_trainvaltest.zip``); every image with ground truth (gtFine, CityPersons) is one
frame of a snippet, named ``<city>_<seq:06d>_<frame:06d>_leftImg8bit.png`` like the snippet's frames.
BlockCopy's clip of an annotated frame ``f`` is the ``clip_length`` snippet frames ``f - clip_length + 1
.. f`` ending at it. The frame number comes from the name: it is often, but not always, 19 (e.g.
``frankfurt_000000_000294``).

Errors about missing data are ``FileNotFoundError`` naming the missing path, followed by a description
of the expected on-disk layout that the calling plugin supplies (``layout``), since where the folders
live depends on the framework's configuration.
"""
from __future__ import annotations

import os

CLIP_LENGTH = 20
"""Frames per clip: the annotated frame and the 19 before it (the method's protocol)."""

IMAGE_SUFFIX = "_leftImg8bit.png"
"""Suffix of every Cityscapes camera image, annotated or not."""

SEQUENCE_FRAMES = "leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame:06d>_leftImg8bit.png"
"""Where the video frames lie under the Cityscapes root, for layout descriptions."""


def layout_error(what: str, path: str, layout: str) -> FileNotFoundError:
    """The error for missing data: ``what`` was not found at ``path``; ``layout`` describes where it should be."""
    return FileNotFoundError(f"Cityscapes video: {what} not found: {path}\n{layout}")


def list_folder(path: str, what: str, layout: str) -> list[str]:
    """The sorted entries of the folder ``path``; :func:`layout_error` naming ``what`` if it is not a folder."""
    if not os.path.isdir(path):
        raise layout_error(what, path, layout)
    return sorted(os.listdir(path))


def split_stem(stem: str, path: str, layout: str) -> tuple[str, str, str]:
    """``"<city>_<seq>_<frame>"`` -> ``(city, seq, frame)`` as strings (their digits kept as written).

    Split from the right, so that a city name with an underscore would still parse.

    Raises:
        ValueError: ``stem`` is not of that form; the message names ``path`` (the file it came from).
    """
    parts = stem.rsplit("_", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ValueError(f"Cityscapes video: file name not of the form "
                         f"<city>_<seq>_<frame:06d>_...: {path}\n{layout}")
    return parts[0], parts[1], parts[2]


def parse_image_name(name: str, source: str, layout: str) -> tuple[str, str, str]:
    """``(city, seq, frame)`` of a camera image name ``[folders/]<city>_<seq>_<frame>_leftImg8bit.png``.

    Args:
        name: the name, possibly with folders in front (only its last component is read).
        source: where the name came from, for the error message (e.g. the annotation file).
        layout: the expected layout, for the error message.

    Raises:
        ValueError: the name does not end in ``_leftImg8bit.png`` or its stem does not parse.
    """
    base = os.path.basename(name)
    if not base.endswith(IMAGE_SUFFIX):
        raise ValueError(f"Cityscapes video: image name {name!r} in {source} does not end in {IMAGE_SUFFIX}: "
                         f"expected <city>_<seq>_<frame:06d>{IMAGE_SUFFIX}\n{layout}")
    return split_stem(base[: -len(IMAGE_SUFFIX)], f"{name} (in {source})", layout)


def clip_frame_paths(sequence_dir: str, city: str, seq: str, frame: str, clip_length: int, layout: str,
                     listings: dict[str, set[str]] | None = None) -> list[str]:
    """The ``clip_length`` sequence frames ending at ``frame``, in order, checked to exist.

    Args:
        sequence_dir: the split's ``leftImg8bit_sequence/<split>`` folder.
        city, seq, frame: the annotated frame's name parts (as :func:`split_stem` returns them); the
            frame numbers keep the width of ``frame``.
        clip_length: frames per clip.
        layout: the expected layout, for error messages.
        listings: a cache of city folder listings shared between calls (one ``stat`` per frame is slow on
            network file systems); filled as cities are first seen.

    Raises:
        FileNotFoundError: the city folder or a frame is missing (the message says which frame of which clip).
        ValueError: ``frame`` is smaller than ``clip_length - 1``, so no clip can end at it.
    """
    listings = {} if listings is None else listings
    city_dir = os.path.join(sequence_dir, city)
    if city_dir not in listings:
        listings[city_dir] = set(
            list_folder(city_dir, "video-frame folder (leftImg8bit_sequence/<split>/<city>)", layout))
    last = int(frame)
    clip_id = f"{city}_{seq}_{frame}"
    if last < clip_length - 1:
        raise ValueError(f"Cityscapes video: annotated frame {clip_id} has frame number {last}, too "
                         f"small for a clip of {clip_length} frames ending at it\n{layout}")
    paths = []
    for index, number in enumerate(range(last - clip_length + 1, last + 1)):
        name = f"{city}_{seq}_{number:0{len(frame)}d}{IMAGE_SUFFIX}"
        if name not in listings[city_dir]:
            raise layout_error(f"frame {index} of {clip_length} of clip {clip_id}", os.path.join(city_dir, name),
                               layout)
        paths.append(os.path.join(city_dir, name))
    return paths
