"""The HTTP adapter: the contract of API.md over the service layer."""
