#!/usr/bin/env python3
"""A cloud service in Python: sends one durable, signed command to a device behind a gateway
through the cloud MQTT broker the gateway's bridge is connected to, follows it to its final
state and prints the result as one JSON line.

The wire contract is the one of the Rust SDK (cloud-client), from the classes generated out of
proto/ (scripts/python-env.sh makes them):

* requests: ApiRequest on `gateways/{gw}/fleet/api/{service}/request` (QoS 1), answered by an
  ApiResponse with the same request_id on `gateways/{gw}/fleet/api/{service}/response`;
* command events: CommandEvent on `gateways/{gw}/fleet/events/commands/{device}`;
* a command is a Command encoded once, signed with Ed25519 by a key of the fleet root's
  `commands` role over b"fleet.v1.Command\\0" + those bytes, and sent as
  SendCommand{command_id, signed=[SignedCommand{command, signatures}]}. The device verifies
  the signature over the bytes exactly as sent, so the encoder's choices do not matter.

`{service}` is the id in the service certificate's `urn:fleet:service:{id}` SAN URI.

  fleet_service.py send --host localhost --port 8883 --ca ca.crt --cert svc.crt --key svc.key \\
      --command-key commands-1.key --gateway gw-0001 --device dev-0001 --name ping --payload up

Exit status: 0 the command succeeded; 1 it ended in another final state (FAILED, REJECTED,
EXPIRED; the JSON line is printed all the same); 2 bad arguments or files; 3 the broker or the
gateway could not be reached, refused the request, or did not answer in time. Every wait is
bounded by --timeout (the whole run) and --connect-timeout.

`fleet_service.py sign ...` prints one signed command as hex, without any network (to check
the signatures against the Rust implementation).
"""

import argparse
import hashlib
import json
import os
import queue
import secrets
import ssl
import sys
import threading
import time
from pathlib import Path


# The generated classes: --gen-dir, else $FLEET_PYTHON_GEN, else the workspace's
# target/python/gen (where scripts/python-env.sh puts them). Read before anything imports them.
def _gen_dir(argv):
    for i, a in enumerate(argv):
        if a == "--gen-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--gen-dir="):
            return a.split("=", 1)[1]
    return os.environ.get(
        "FLEET_PYTHON_GEN",
        str(Path(__file__).resolve().parents[2] / "target" / "python" / "gen"),
    )


GEN_DIR = _gen_dir(sys.argv)
sys.path.insert(0, GEN_DIR)

try:
    import paho.mqtt.client as mqtt
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from fleet.v1 import device_pb2, fleet_pb2, update_pb2
except ImportError as e:  # pragma: no cover - a setup problem, said plainly
    sys.stderr.write(
        f"fleet_service: error: {e} (run scripts/python-env.sh and use target/python/venv/bin/python;"
        f" generated classes looked for in {GEN_DIR})\n"
    )
    sys.exit(2)

# Domain separation of command signatures (fleet_proto::command::COMMAND_CONTEXT).
COMMAND_CONTEXT = b"fleet.v1.Command\x00"
FINAL_STATES = {
    fleet_pb2.COMMAND_STATE_SUCCEEDED,
    fleet_pb2.COMMAND_STATE_FAILED,
    fleet_pb2.COMMAND_STATE_REJECTED,
    fleet_pb2.COMMAND_STATE_EXPIRED,
}
# How often the command's state is re-read while waiting (an event missed over a reconnect
# only delays the answer).
POLL_INTERVAL_S = 2.0
# Messages that do not decode are skipped and counted; only the first few are logged.
MAX_BAD_MESSAGE_LOGS = 3

EXIT_OK, EXIT_NOT_SUCCEEDED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Failure(Exception):
    """A run that cannot go on: a message for a human and the exit status."""

    def __init__(self, message, status=EXIT_UNREACHABLE):
        super().__init__(message)
        self.status = status


# ---- signing ---------------------------------------------------------------------------------


class CommandKey:
    """An Ed25519 key of the `commands` role, from a PKCS#8 PEM file."""

    def __init__(self, path):
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise Failure(f"command key {path}: {e}", EXIT_USAGE) from e
        if not isinstance(key, Ed25519PrivateKey):
            raise Failure(f"command key {path}: not an Ed25519 key", EXIT_USAGE)
        self._key = key
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        # fleet_proto::signing::key_id: hex of the first 8 bytes of SHA-256 of the public key.
        self.key_id = hashlib.sha256(public).digest()[:8].hex()

    def sign_command(self, command):
        """A SignedCommand over `command`, encoded here once."""
        data = command.SerializeToString()
        signature = update_pb2.Signature(
            key_id=self.key_id,
            algorithm=update_pb2.SIGNATURE_ALGORITHM_ED25519,
            signature=self._key.sign(COMMAND_CONTEXT + data),
        )
        return device_pb2.SignedCommand(command=data, signatures=[signature])


def new_command_id():
    return "c-" + secrets.token_hex(8)


def build_command(args, issued_by, now_ms):
    return device_pb2.Command(
        command_id=args.command_id or new_command_id(),
        name=args.name,
        payload=args.payload.encode(),
        issued_at_ms=now_ms,
        expires_at_ms=now_ms + args.ttl_ms,
        issued_by=issued_by,
        device_id=args.device,
    )


def service_id(cert_path):
    """The id in the certificate's `urn:fleet:service:{id}` SAN URI."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound) as e:
        raise Failure(f"certificate {cert_path}: {e}", EXIT_USAGE) from e
    prefix = "urn:fleet:service:"
    ids = [u[len(prefix):] for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
           if u.startswith(prefix)]
    if len(ids) != 1:
        raise Failure(f"certificate {cert_path}: no single {prefix}ID SAN URI (not a service?)",
                      EXIT_USAGE)
    return ids[0]


# ---- the API over MQTT -----------------------------------------------------------------------


class Api:
    """One MQTT session with the cloud broker: requests matched to responses by request id,
    command events queued. paho's network thread only puts into queues."""

    def __init__(self, args, service):
        self.service = service
        base = f"gateways/{args.gateway}/fleet"
        self.request_topic = f"{base}/api/{service}/request"
        self.response_topic = f"{base}/api/{service}/response"
        self.events_topic = f"{base}/events/commands/+"
        self.inbox = queue.Queue()  # ("response", ApiResponse) | ("event", CommandEvent)
        self.subscribed = threading.Event()
        self.connect_error = None
        self.bad_messages = 0
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{service}:{secrets.token_hex(6)}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        try:
            self.client.tls_set(ca_certs=args.ca, certfile=args.cert, keyfile=args.key,
                                tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as e:
            raise Failure(f"TLS files: {e}", EXIT_USAGE) from e
        self.client.connect_timeout = args.connect_timeout
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            self.connect_error = f"the broker refused the connection: {reason}"
            return
        # Every (re)connect: clean session, so the subscriptions are made again.
        client.subscribe([(self.response_topic, 1), (self.events_topic, 1)])

    def _on_subscribe(self, _client, _userdata, _mid, reasons, _props):
        if any(r.is_failure for r in reasons):
            self.connect_error = "the broker refused the subscriptions (check its ACL)"
        else:
            self.subscribed.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason, _props):
        if reason.is_failure:
            self.connect_error = f"disconnected: {reason}"

    def _on_message(self, _client, _userdata, msg):
        try:
            if msg.topic == self.response_topic:
                self.inbox.put(("response", fleet_pb2.ApiResponse.FromString(msg.payload)))
            else:
                self.inbox.put(("event", fleet_pb2.CommandEvent.FromString(msg.payload)))
        except Exception as e:  # a payload that does not decode: counted, skipped
            self.bad_messages += 1
            if self.bad_messages <= MAX_BAD_MESSAGE_LOGS:
                sys.stderr.write(f"fleet_service: skipped a bad message on {msg.topic}: {e}\n")

    def connect(self, host, port, within):
        deadline = time.monotonic() + within
        try:
            self.client.connect(host, port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            raise Failure(f"cannot connect to {host}:{port}: {e}") from e
        self.client.loop_start()
        while not self.subscribed.wait(0.1):
            problem = None
            if self.connect_error:
                problem = self.connect_error
            elif time.monotonic() >= deadline:
                problem = f"not connected and subscribed within {within} s"
            if problem:
                self.close()
                raise Failure(f"{host}:{port}: {problem}")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, body_field, body):
        """Publishes a request; returns its request id."""
        request_id = secrets.token_hex(8)
        req = fleet_pb2.ApiRequest(request_id=request_id)
        getattr(req, body_field).CopyFrom(body)
        info = self.client.publish(self.request_topic, req.SerializeToString(), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise Failure(f"cannot publish on {self.request_topic}: {mqtt.error_string(info.rc)}")
        return request_id

    def next(self, until):
        """The next (kind, message) before the monotonic instant `until`, or None."""
        try:
            return self.inbox.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None


def api_error(resp):
    e = resp.error
    return f"{fleet_pb2.ApiErrorCode.Name(e.code)}: {e.message}"


def run_send(args):
    for path in (args.ca, args.cert, args.key, args.command_key):
        if not Path(path).is_file():
            raise Failure(f"no such file: {path}", EXIT_USAGE)
    key = CommandKey(args.command_key)
    service = service_id(args.cert)
    deadline = time.monotonic() + args.timeout
    api = Api(args, service)
    api.connect(args.host, args.port, min(args.connect_timeout, args.timeout))
    try:
        command = build_command(args, service, int(time.time() * 1000))
        signed = key.sign_command(command)
        send_id = api.send("send_command", fleet_pb2.SendCommand(
            command_id=command.command_id, signed=[signed]))
        record = None
        accepted = False
        next_poll = time.monotonic() + POLL_INTERVAL_S
        while record is None or record.state not in FINAL_STATES:
            now = time.monotonic()
            if now >= deadline:
                state = fleet_pb2.CommandState.Name(record.state) if record else "no answer"
                what = (f"command {command.command_id} not final within {args.timeout} s ({state})"
                        if accepted else
                        f"no answer to the request on {api.request_topic} within {args.timeout} s"
                        f" (is gateway {args.gateway} bridged to this broker?)")
                raise Failure(what)
            if accepted and now >= next_poll:
                api.send("get_command", fleet_pb2.GetCommand(command_id=command.command_id,
                                                             device_id=args.device))
                next_poll = now + POLL_INTERVAL_S
            got = api.next(min(deadline, next_poll) if accepted else deadline)
            if got is None:
                continue
            kind, msg = got
            recs = []
            if kind == "response":
                if msg.WhichOneof("body") == "error":
                    if msg.request_id == send_id:
                        raise Failure(f"the gateway refused the command: {api_error(msg)}")
                    continue
                if msg.request_id == send_id:
                    accepted = True
                    recs = msg.send_command.commands
                elif msg.WhichOneof("body") == "get_command":
                    recs = msg.get_command.commands
            elif not msg.foreign:
                recs = [msg.command]
            for r in recs:
                if r.command_id != command.command_id or r.device_id != args.device:
                    continue
                # Never back from a final state (an event and a query may cross).
                if record is None or record.state not in FINAL_STATES:
                    record = r
    finally:
        api.close()
        if api.bad_messages > MAX_BAD_MESSAGE_LOGS:
            sys.stderr.write(f"fleet_service: {api.bad_messages} bad messages skipped in all\n")
    output = record.result.output
    try:
        output_field = {"output": output.decode("utf-8")}
    except UnicodeDecodeError:
        output_field = {"output_hex": output.hex()}
    result = {
        "gateway": args.gateway,
        "device_id": record.device_id,
        "command_id": record.command_id,
        "state": fleet_pb2.CommandState.Name(record.state).removeprefix("COMMAND_STATE_"),
        "attempts": record.attempts,
        **output_field,
        "message": record.result.message,
        "signed_by": key.key_id,
    }
    print(json.dumps(result, sort_keys=True), flush=True)
    if record.state != fleet_pb2.COMMAND_STATE_SUCCEEDED:
        raise Failure(f"command {record.command_id} ended {result['state']}: "
                      f"{record.result.message or 'no message'}", EXIT_NOT_SUCCEEDED)


def run_sign(args):
    key = CommandKey(args.command_key)
    command = build_command(args, args.issued_by, args.issued_at_ms)
    print(key.sign_command(command).SerializeToString().hex(), flush=True)


# ---- command line ----------------------------------------------------------------------------


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gen-dir", help="where the generated classes are (default: target/python/gen)")
    sub = p.add_subparsers(dest="action", required=True)

    def command_args(s):
        s.add_argument("--command-key", required=True,
                       help="PKCS#8 PEM Ed25519 key of the root's commands role")
        s.add_argument("--device", required=True, help="target device id")
        s.add_argument("--name", required=True, help="command name")
        s.add_argument("--payload", default="", help="command payload (UTF-8 text)")
        s.add_argument("--command-id", default="", help="command id (default: a fresh c-…)")
        s.add_argument("--ttl-ms", type=int, default=3_600_000,
                       help="the command expires this long after it is issued (default 1 h)")

    s = sub.add_parser("send", help="send a command and wait for its final state")
    s.add_argument("--host", required=True, help="cloud broker host (checked against its certificate)")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ca", required=True, help="fleet CA bundle (PEM)")
    s.add_argument("--cert", required=True, help="service certificate (PEM)")
    s.add_argument("--key", required=True, help="service private key (PEM)")
    s.add_argument("--gateway", required=True, help="gateway id, e.g. gw-0001")
    s.add_argument("--timeout", type=float, default=30.0, help="bound of the whole run, s")
    s.add_argument("--connect-timeout", type=float, default=10.0, help="bound of the connect, s")
    command_args(s)

    g = sub.add_parser("sign", help="print one signed command (hex), no network")
    g.add_argument("--issued-by", required=True)
    g.add_argument("--issued-at-ms", type=int, required=True)
    command_args(g)

    args = p.parse_args(argv)
    if args.ttl_ms <= 0:
        p.error("--ttl-ms must be positive")
    return args


def main(argv):
    args = parse(argv)
    try:
        (run_send if args.action == "send" else run_sign)(args)
    except Failure as e:
        sys.stderr.write(f"fleet_service: error: {e}\n")
        return e.status
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
