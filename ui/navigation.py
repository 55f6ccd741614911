"""The one place LayerLab touches a Streamlit internal: starting in ``st.navigation`` mode despite ``pages/``.

The product keeps its pages in a folder named ``pages/`` (the promised
layout).  Streamlit's documented behaviour is that ``st.navigation`` makes it
ignore that folder, and ``st.navigation`` itself sets
``PagesManager.uses_pages_directory = False``; but the *first* run of a new
server still starts in the legacy multipage mode (the flag is computed from
the folder's existence before any script runs), and widget ids of that run
differ from later runs, so the first session's first sidebar input would be
lost.  There is no public option for this (checked against Streamlit's
docs and its multipage issues), so we flip the same flag ``st.navigation``
flips, one run earlier, and rerun.  ``tests/ui/test_navigation.py`` fails when
a Streamlit upgrade removes the flag or changes what it means.
"""

from __future__ import annotations

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager


def enter_through_the_router() -> None:
    """Call first in ``app.py`` and in every page: leave the legacy pages-folder mode and rerun (the first run of
    a server only).  A page opened by its own URL on a new server (a bookmark, a reload after a restart) would
    otherwise run alone, without ``app.py``'s sidebar and with file names as navigation; the rerun sends it
    through ``app.py``'s router to the same page."""
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()
