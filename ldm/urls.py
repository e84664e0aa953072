"""URLs as messages may show them."""

import re

# The password of `scheme://user:password@host`, which a tracking or API URL may carry.
_URI_PASSWORD = re.compile(r"(://[^/\s:@]*):[^/\s@]*@")


def redacted(text: str) -> str:
    """`text` with the password of every URI in it replaced by ***. Error messages quote tracking URIs, and
    MLflow's and Prefect's quote the URL of a failed request, any of which may carry credentials."""
    return _URI_PASSWORD.sub(r"\1:***@", text)
