"""The rules that forms, services, selectors and the API share, with no request and no ORM writes: each module
is importable and testable without a database."""
