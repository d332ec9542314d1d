"""Fine-tuning end to end through the gateway with the official `openai` SDK: upload a file, create a
LoRA SFT job on SmolLM2, follow its events to success across a controller restart (the running trainer
is re-attached), then chat with the `ft:` model — it states the fact it was taught while a base-model
request in the same batch still answers as the base. A queued job and a running job are cancelled
(the trainer process is gone afterwards); bad input gets OpenAI's 4xx errors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from shared.store import DEFAULT_MODEL
from tests.train.train_helpers import FACT_QUESTIONS, fact_rows

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": FACT_QUESTIONS[0]}]


class ControllerProcess:
    """`tandem serve controller` as a real process (so it can be killed and restarted on its port)."""

    def __init__(self, home: Path, store_root: Path):
        self.home, self.store_root, self.port, self.proc = home, store_root, 0, None

    def start(self) -> str:
        port_file = self.home / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "services.platform.cli.main", "serve", "controller", "--store", str(self.store_root),
               "--home", str(self.home), "--cpus", "1", "--port", str(self.port), "--port-file", str(port_file),
               "--threads-per-worker", "2", "--poll-interval", "0.3"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=open(self.home / "controller.log", "ab")
        )
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, (
                self.home / "controller.log"
            ).read_text()
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture(scope="module")
def stack(platform, store, store_root, default_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("controller")
    home.mkdir(exist_ok=True)
    controller = ControllerProcess(home, store_root)
    address = controller.start()
    tokenizer = platform.start_tokenizer(store)
    worker, worker_service = platform.start_worker(default_model_dir)
    router, _ = platform.start_router([worker.address])
    url = platform.start_gateway(tokenizer.address, router.address, controller=address)
    yield {"url": url, "controller": controller, "home": home, "worker": worker_service}
    controller.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def upload(client, rows: list[dict], name: str = "fact.jsonl"):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return client.files.create(file=(name, data), purpose="fine-tune")


def wait_for(client, job_id: str, states: tuple[str, ...], timeout: float = 420, min_step: int = 0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in states and (job.model_extra or {}).get("tandem", {}).get("step", 0) >= min_step:
            return job
        assert job.status not in ("failed", "cancelled") or job.status in states, job.error
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach {states}: {job.status}")


def trainer_processes(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and job_id in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def chat(client, model: str) -> str:
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
    return resp.choices[0].message.content


def test_bad_input_gets_openai_errors(client):
    with pytest.raises(openai.BadRequestError, match=r"bad\.jsonl:2: .*assistant"):
        upload(client, [fact_rows()[0], {"messages": [{"role": "user", "content": "hi"}]}], "bad.jsonl")
    with pytest.raises(openai.BadRequestError, match=r"broken\.jsonl:1: not valid JSON"):
        client.files.create(file=("broken.jsonl", b"{not json\n"), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b'{"text": "a"}\n'), purpose="assistants")
    f = upload(client, fact_rows())
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="n_epochs: Input should be greater than 0"):
        client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL, training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="beta is a dpo hyperparameter"):
        client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL, training_file=f.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="sft examples, but the method is dpo"):
        client.fine_tuning.jobs.create(model=DEFAULT_MODEL, training_file=f.id, method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="asks for 2 GPUs, the controller has 0"):
        client.fine_tuning.jobs.create(
            model=DEFAULT_MODEL, training_file=f.id, extra_body={"tandem": {"gpus_per_worker": 2}}
        )
    with pytest.raises(openai.BadRequestError, match="no such file"):
        client.fine_tuning.jobs.create(model=DEFAULT_MODEL, training_file="file-missing")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_a_lora_job_survives_a_controller_restart_and_its_model_is_served_beside_the_base(client, stack):
    f = upload(client, fact_rows())
    held_out = upload(client, fact_rows()[::2], "held-out.jsonl")
    assert client.files.retrieve(f.id).filename == "fact.jsonl"
    job = client.fine_tuning.jobs.create(
        model=DEFAULT_MODEL, training_file=f.id, validation_file=held_out.id, suffix="zorblaxia", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
        extra_body={"tandem": {"learning_rate": 1e-3, "max_steps": 20, "lora": {"r": 16, "alpha": 32}}},
    )  # fmt: skip
    assert job.status == "queued" and job.method.type == "supervised"
    # the controller runs one trainer at a time here: a second job waits
    queued = client.fine_tuning.jobs.create(model=DEFAULT_MODEL, training_file=f.id)
    running = wait_for(client, job.id, ("running",), min_step=2)
    assert time.time() - 5 <= running.estimated_finish <= time.time() + 600  # an instant ahead, not behind
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"

    stack["controller"].kill()  # mid-job: the trainer runs on in its own session
    stack["controller"].start()
    assert client.fine_tuning.jobs.retrieve(queued.id).status == "queued"  # still waiting its turn
    assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(queued.id)
    done = wait_for(client, job.id, ("succeeded",))
    name = f"ft:{DEFAULT_MODEL}:zorblaxia:{job.id}"
    assert done.fine_tuned_model == name and done.trained_tokens > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data][::-1]
    assert (
        messages[0].startswith("Created fine-tuning job")
        and messages[-1] == "The job has successfully completed"
    )
    assert any(m.startswith("Controller restarted; re-attached") for m in messages)
    steps = [m for m in messages if m.startswith("Step ")]
    assert len(steps) == 20 and steps[-1].startswith("Step 20/20")  # none lost across the restart
    metrics = [
        e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"
    ]
    first_loss, last = metrics[-1]["train_loss"], metrics[0]
    assert "full_valid_loss" in last and "full_valid_loss" not in metrics[1]  # once, after the last step
    assert last["full_valid_loss"] < first_loss / 4  # the held-out questions are learned too
    assert done.model_extra["tandem"]["valid_loss"] == pytest.approx(last["full_valid_loss"])
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data][0] == 20
    queued_events = [e.message for e in client.fine_tuning.jobs.list_events(queued.id).data]
    assert not any("started" in m for m in queued_events)

    models = {m.id: m for m in client.models.list().data}
    assert models[name].model_extra["parent"] == DEFAULT_MODEL
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # adapter and base requests share batches
        answers = list(pool.map(lambda m: chat(client, m), [name, DEFAULT_MODEL, name, DEFAULT_MODEL]))
    assert "Quintavel" in answers[0] and answers[0] == answers[2]
    assert "Quintavel" not in answers[1] and answers[1] == answers[3]
    assert answers[1] == chat(client, DEFAULT_MODEL)  # the base alone answers the same
    assert name in stack["worker"].engine.engine.loras

    # deleting the fine-tune: gone from the store, the list and the API at once
    with pytest.raises(openai.NotFoundError):
        client.models.delete(DEFAULT_MODEL)  # only fine-tunes made here
    assert client.models.delete(name).deleted
    assert name not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(client, name)
    assert client.fine_tuning.jobs.list().data[0].id == queued.id  # newest first


def tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.platform.cli.main", "train", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_the_cli_submits_follows_and_cancels_and_cancelling_stops_the_trainer(client, stack, tmp_path):
    """`tandem train submit|list|get|logs|cancel` against the same controller; cancelling a running
    job stops its trainer process and frees its place for the next job."""
    ctl = ("--controller", f"127.0.0.1:{stack['controller'].port}")
    data = tmp_path / "fact.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in fact_rows()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "hi"}\n')
    failed = tandem("submit", *ctl, "--model", DEFAULT_MODEL, "--file", str(bad))
    assert (
        failed.returncode == 1
        and "tandem: error: bad.jsonl:1: 'messages' must be a non-empty list" in failed.stderr
    )

    submitted = tandem("submit", *ctl, "--model", DEFAULT_MODEL, "--file", str(data), "--max-steps", "200")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    wait_for(client, job_id, ("running",))
    assert trainer_processes(job_id)
    follower = subprocess.Popen([sys.executable, "-m", "services.platform.cli.main", "train", "logs", *ctl, job_id, "--follow"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    cancelled = tandem("cancel", *ctl, job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{job_id} cancelled"
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 1 and f"job {job_id} cancelled" in err and "The job was cancelled" in err
    deadline = time.monotonic() + 30
    while trainer_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not trainer_processes(job_id)
    assert json.loads(tandem("get", *ctl, job_id).stdout)["status"] == "cancelled"
    assert f"{job_id}  cancelled" in tandem("list", *ctl).stdout
    assert "[info] Files validated" in tandem("logs", *ctl, job_id).stdout
    again = tandem("cancel", *ctl, job_id)
    assert again.returncode == 1 and "has already cancelled" in again.stderr
    # what it held is free: the next job starts
    nxt = client.fine_tuning.jobs.create(model=DEFAULT_MODEL, training_file=upload(client, fact_rows()).id,
                                         extra_body={"tandem": {"max_steps": 200}})  # fmt: skip
    wait_for(client, nxt.id, ("running",))
    client.fine_tuning.jobs.cancel(nxt.id)
    assert os.path.isdir(stack["home"] / "jobs" / job_id)
