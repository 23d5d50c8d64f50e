"""Two coordinator processes on one agents dir (a shared volume): their blueprint writes are
serialised across the processes, so none is lost or torn."""

import threading

import requests

from server_process import ServerProcess


def test_writes_from_two_processes_are_serialised(tmp_path):
    agents = tmp_path / "agents"
    env = {"AGENT_ORCHESTRATOR_AGENTS_DIR": str(agents)}
    with ServerProcess(tmp_path / "a", **env) as a, ServerProcess(tmp_path / "b", **env) as b:
        # Both create the same name at once: exactly one wins.
        statuses: list[int] = []
        barrier = threading.Barrier(2)

        def create(server):
            barrier.wait()
            statuses.append(server.post("/agents", json={"name": "shared", "description": "d"}).status_code)

        threads = [threading.Thread(target=create, args=(server,)) for server in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(statuses) == [201, 409]

        # Each round, one process changes the description and the other the tags, at once: a
        # read-modify-write of agent.json that is not serialised loses one of the two.
        def patch(server, body, session):
            barrier.wait()
            r = session.patch(server.url + "/agents/shared", json=body, timeout=30)
            assert r.status_code == 200, r.text

        with requests.Session() as session_a, requests.Session() as session_b:
            for i in range(40):
                threads = [
                    threading.Thread(target=patch, args=(a, {"description": f"d{i}"}, session_a)),
                    threading.Thread(target=patch, args=(b, {"tags": [f"t{i}"]}, session_b)),
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                agent = a.get("/agents/shared").json()
                assert (agent["description"], agent["tags"]) == (f"d{i}", [f"t{i}"])
        assert [agent["name"] for agent in b.get("/agents").json()] == ["shared"]
