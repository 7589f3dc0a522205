"""One router per API surface: ``native`` (/transcribe), ``openai`` (/v1), ``ops`` (health, stats,
metrics, info). Shared objects come in through FastAPI dependencies (``deps``), so a test can
import a router on its own and swap any of them with ``app.dependency_overrides``."""
