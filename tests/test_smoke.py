from tests.support import Client


async def test_register_then_list(client: Client) -> None:
    node = await client.register("gpu-1")
    assert node["status"] == "pending"
    nodes = await client.call("list")
    assert [n["name"] for n in nodes] == ["gpu-1"]
