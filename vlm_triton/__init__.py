"""Glue between Triton's Python backend and the shared engine (imported inside the stub).

The stub embeds an interpreter that never applies the environment's locale, so text files
opened without an encoding would be read as ASCII (inductor's code templates, for one, hold
UTF-8): the locale is set from the environment here, or to C.UTF-8 when that is not UTF-8.
"""

import locale


def _utf8_locale() -> None:
    for name in ("", "C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            return


_utf8_locale()
