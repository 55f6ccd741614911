"""Widgets several pages share: data choice, progress, captions."""

from __future__ import annotations

import streamlit as st

from engine.data import SOURCES, DataError, DataSpec, save_upload
from engine.models import LoadedModel


def data_spec_controls(
    key: str, split: str, loaded: LoadedModel, windows: int = 16, seqlen: int = 256
) -> DataSpec | None:
    """Source, windows and seqlen widgets; None (with a message shown) if unusable."""
    cols = st.columns(3)
    source = cols[0].selectbox(
        "Text", SOURCES, key=f"{key}_source",
        help="wiki-offline: Wikipedia sample bundled with gensim (works offline). "
        "wikitext2: needs the dataset cached or the hub reachable. file: your own UTF-8 text.",
    )
    n_windows = cols[1].number_input("Windows", 1, 4096, windows, key=f"{key}_windows")
    seq = cols[2].number_input("Seqlen (tokens)", 16, 32768, seqlen, step=16, key=f"{key}_seqlen")
    path = None
    if source == "file":
        upload = st.file_uploader("Text file (UTF-8)", type=None, key=f"{key}_upload")
        if upload is None:
            st.info("Upload a plain-text file to use it.")
            return None
        try:
            path = str(save_upload(upload.getvalue(), upload.name))
        except DataError as err:
            st.error(str(err))
            return None
    if seq > loaded.max_seqlen:
        st.error(f"Seqlen {seq} is longer than this model allows ({loaded.max_seqlen}). Choose less.")
        return None
    return DataSpec(source=source, split=split, seqlen=int(seq), n_windows=int(n_windows), path=path)


def progress_callback(label: str):
    """A Streamlit progress bar and a ``(stage, done, total)`` callback that moves it."""
    bar = st.progress(0.0, text=label)

    def update(stage: str, done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{label} · {stage}: {done}/{total}")

    return update


def computed_on(loaded: LoadedModel, data_label: str) -> str:
    """Caption stating what a chart or number was computed on."""
    return f"Model {loaded.source} ({loaded.card['dtype']}, fingerprint {loaded.fingerprint}); data {data_label}."


def chart_with_csv(fig, table, name: str, caption: str) -> None:
    """A Plotly chart, its caption, and a CSV download of the table behind it."""
    st.plotly_chart(fig, key=f"chart_{name}")
    st.caption(caption)
    st.download_button(
        f"Download {name}.csv", table.to_csv(index=table.index.name is not None).encode(),
        file_name=f"{name}.csv", mime="text/csv", key=f"csv_{name}",
    )
