"""The version m1 writes into every manifest (`tool`), below everything that writes one."""

__version__ = "0.1.0"
