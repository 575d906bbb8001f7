"""The Triton process wrapper's pieces that need no server."""


def test_free_ports_are_distinct():
    from pipeline_lib.serving.server import free_ports

    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(p > 0 for p in ports)
