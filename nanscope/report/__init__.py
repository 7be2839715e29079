"""Writers that present a `Result`: terminal (rich), JSON, HTML, CI. None of them diagnose anything."""
