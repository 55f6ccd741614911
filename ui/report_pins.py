"""The report builder's pins: any chart on any page can be added, with a note, to this session's report."""

from __future__ import annotations

import hashlib

import streamlit as st

from engine.viz.report import ReportItem

PINS = "report_pins"


def pinned() -> list[ReportItem]:
    """This session's pinned charts, in pinning order."""
    return st.session_state.setdefault(PINS, [])


def pin_key(fig, caption: str) -> str:
    """What a pin shows: the figure's data and layout and what it was computed on (two charts with the same
    title but other runs or data are two pins; the very same chart pinned again is one)."""
    return hashlib.sha256((fig.to_json() + caption).encode()).hexdigest()[:16]


def pin_button(fig, name: str, caption: str, table) -> None:
    """'Add to report' with an optional note; pinning the very same chart again only updates its note. The note
    box is emptied once pinned, so the next pin does not carry it."""
    with st.popover("Add to report", width="stretch"):
        st.text_area("Note for the report (optional)", key=f"pin_note_{name}")
        st.button("Pin this chart", key=f"pin_{name}", on_click=_pin, args=(fig, name, caption, table))


def _pin(fig, name: str, caption: str, table) -> None:
    """Add (or update) the pin; a callback, so it may empty the note box before the page is drawn again."""
    note = st.session_state.get(f"pin_note_{name}", "")
    title = (fig.layout.title.text or name).split("<br>")[0]
    key = pin_key(fig, caption)
    items = list(pinned())
    same = next((i for i, item in enumerate(items) if item.key == key), None)
    item = ReportItem(title=title, figure=fig, computed_on=caption,
                      table=table if table is not None else _empty(), note=note, key=key)
    if same is None:
        items.append(item)
    else:
        items[same] = item
    st.session_state[PINS] = items
    st.session_state[f"pin_note_{name}"] = ""
    st.toast(f"{'Pinned' if same is None else 'Updated the note of'} '{title}' ({len(items)} chart(s) in the "
             "report; build it on the Results page).")


def _empty():
    import pandas as pd

    return pd.DataFrame()
