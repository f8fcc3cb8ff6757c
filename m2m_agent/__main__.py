"""``python -m m2m_agent``: the same as the ``m2m-agent`` command."""

from __future__ import annotations

import sys

from m2m_agent._cli import main

if __name__ == "__main__":
    sys.exit(main())
