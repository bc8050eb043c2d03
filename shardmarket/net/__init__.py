"""Networking shared by nodes and clients: the wire format, session encryption and result commitments."""
