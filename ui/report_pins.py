"""The report builder's pins: any chart on any page can be added, with a note, to this session's report."""

from __future__ import annotations

import streamlit as st

from engine.viz.report import ReportItem

PINS = "report_pins"


def pinned() -> list[ReportItem]:
    """This session's pinned charts, in pinning order."""
    return st.session_state.setdefault(PINS, [])


def pin_button(fig, name: str, caption: str, table) -> None:
    """'Add to report' with an optional note; pinning the same chart again replaces it."""
    with st.popover("Add to report", width="stretch"):
        note = st.text_area("Note for the report (optional)", key=f"pin_note_{name}")
        if st.button("Pin this chart", key=f"pin_{name}"):
            title = (fig.layout.title.text or name).split("<br>")[0]
            items = [item for item in pinned() if item.title != title]
            items.append(ReportItem(title=title, figure=fig, computed_on=caption,
                                    table=table if table is not None else _empty(), note=note))
            st.session_state[PINS] = items
            st.toast(f"Pinned '{name}' ({len(items)} chart(s) in the report; build it on the Results page).")


def _empty():
    import pandas as pd

    return pd.DataFrame()
