#!/usr/bin/env python3
"""An MQTT 5 client on paho-mqtt 2.x, driven by the end-to-end tests (tests/src/clients.rs).

    paho_v5.py HOST PORT STEPS_JSON

STEPS_JSON is a list of steps run in order (see OPS below). Everything the broker says is
printed on stdout as one JSON object per line ("event": connack, suback, unsuback, puback,
message, disconnected, done, error). Every wait is bounded, and the whole run by an alarm
(default 30 s, step {"op": "timeout", "secs": N} changes it). Binary fields are hex
("payload_hex", "correlation_data_hex", "password_hex").
"""

import json
import os
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

lock = threading.Condition()
state = {"connack": None, "subacks": {}, "unsubacks": {}, "pubacks": {}, "messages": 0,
         "disconnected": None}


def emit(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def code(rc):
    return rc.value if isinstance(rc, ReasonCode) else int(rc)


def props_to_json(props):
    if props is None:
        return {}
    out = {}
    for name, value in props.json().items():
        if isinstance(value, (bytes, bytearray)):
            out[name + "_hex"] = bytes(value).hex()
        elif name == "UserProperty":
            out[name] = [list(kv) for kv in value]
        else:
            out[name] = value
    return out


def props_from_json(packet_type, spec):
    """{"UserProperty": [[k, v], ...], "ContentType": ..., "CorrelationData_hex": ...}"""
    if not spec:
        return None
    props = Properties(packet_type)
    for name, value in spec.items():
        if name.endswith("_hex"):
            setattr(props, name[:-4], bytes.fromhex(value))
        elif name == "UserProperty":
            props.UserProperty = [tuple(kv) for kv in value]
        else:
            setattr(props, name, value)
    return props


def payload_of(step, prefix=""):
    if prefix + "payload_hex" in step:
        return bytes.fromhex(step[prefix + "payload_hex"])
    return step.get(prefix + "payload", "").encode()


def on_connect(client, userdata, flags, reason_code, properties):
    with lock:
        state["connack"] = code(reason_code)
        lock.notify_all()
    emit({"event": "connack", "reason": code(reason_code),
          "session_present": bool(flags.session_present), "props": props_to_json(properties)})


def on_subscribe(client, userdata, mid, reason_codes, properties):
    codes = [code(rc) for rc in reason_codes]
    emit({"event": "suback", "mid": mid, "reasons": codes})
    with lock:
        state["subacks"][mid] = codes
        lock.notify_all()


def on_unsubscribe(client, userdata, mid, reason_codes, properties):
    codes = [code(rc) for rc in reason_codes]
    emit({"event": "unsuback", "mid": mid, "reasons": codes})
    with lock:
        state["unsubacks"][mid] = codes
        lock.notify_all()


def on_publish(client, userdata, mid, reason_code, properties):
    emit({"event": "puback", "mid": mid, "reason": code(reason_code)})
    with lock:
        state["pubacks"][mid] = code(reason_code)
        lock.notify_all()


def on_message(client, userdata, msg):
    try:
        text = msg.payload.decode()
    except UnicodeDecodeError:
        text = None
    emit({"event": "message", "topic": msg.topic, "payload": text,
          "payload_hex": msg.payload.hex(), "qos": msg.qos, "retain": bool(msg.retain),
          "props": props_to_json(getattr(msg, "properties", None))})
    with lock:
        state["messages"] += 1
        lock.notify_all()


# paho-mqtt 2.1 drops the reason code of a server DISCONNECT whose remaining length is 1 or
# 2 (reason code, then no property length or 0), which is what brokers send without
# properties (eclipse-paho/paho.mqtt.python#860, fix proposed in PR #955): the reason code
# is read from the packet here before paho handles it.
_paho_handle_disconnect = mqtt.Client._handle_disconnect


def _handle_disconnect(self):
    if self._in_packet["remaining_length"] >= 1:
        state["server_reason"] = self._in_packet["packet"][0]
    return _paho_handle_disconnect(self)


mqtt.Client._handle_disconnect = _handle_disconnect


def on_disconnect(client, userdata, flags, reason_code, properties):
    rc = state.pop("server_reason", None)
    emit({"event": "disconnected", "reason": code(reason_code) if rc is None else rc,
          "from_server": rc is not None})
    with lock:
        state["disconnected"] = code(reason_code)
        lock.notify_all()


def wait_for(pred, secs, what):
    deadline = time.monotonic() + secs
    with lock:
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0:
                emit({"event": "error", "error": "timeout waiting for " + what})
                return False
            lock.wait(left)
    return True


def make_client(step):
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                         client_id=step.get("id", ""), protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_unsubscribe = on_unsubscribe
    client.on_publish = on_publish
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    if "username" in step or "password_hex" in step or "password" in step:
        password = (bytes.fromhex(step["password_hex"]) if "password_hex" in step
                    else step.get("password"))
        client.username_pw_set(step.get("username"), password)
    will = step.get("will")
    if will:
        client.will_set(will["topic"], payload_of(will), will.get("qos", 0),
                        will.get("retain", False),
                        props_from_json(PacketTypes.WILLMESSAGE, will.get("props")))
    return client


def op_connect(ctx, step):
    client = make_client(step)
    ctx["client"] = client
    props = props_from_json(PacketTypes.CONNECT, step.get("props"))
    with lock:
        state["connack"] = None
        state["disconnected"] = None
    client.connect(ctx["host"], ctx["port"], keepalive=step.get("keepalive", 60),
                   clean_start=step.get("clean_start", True), properties=props)
    client.loop_start()
    wait_for(lambda: state["connack"] is not None or state["disconnected"] is not None,
             step.get("wait", 10), "CONNACK")


def op_subscribe(ctx, step):
    subs = []
    for f in step["filters"]:
        options = mqtt.SubscribeOptions(qos=f.get("qos", 0), noLocal=f.get("no_local", False),
                                        retainAsPublished=f.get("retain_as_published", False),
                                        retainHandling=f.get("retain_handling", 0))
        subs.append((f["filter"], options))
    props = props_from_json(PacketTypes.SUBSCRIBE, step.get("props"))
    _, mid = ctx["client"].subscribe(subs, properties=props)
    if step.get("wait", True):
        wait_for(lambda: mid in state["subacks"] or state["disconnected"] is not None, 10,
                 "SUBACK")


def op_unsubscribe(ctx, step):
    _, mid = ctx["client"].unsubscribe(step["filters"])
    wait_for(lambda: mid in state["unsubacks"], 10, "UNSUBACK")


def op_publish(ctx, step):
    props = props_from_json(PacketTypes.PUBLISH, step.get("props"))
    info = ctx["client"].publish(step["topic"], payload_of(step), step.get("qos", 0),
                                 step.get("retain", False), props)
    if step.get("qos", 0) > 0 and step.get("wait", True):
        wait_for(lambda: info.mid in state["pubacks"] or state["disconnected"] is not None,
                 10, "PUBACK")


def op_expect(ctx, step):
    n = step["count"]
    wait_for(lambda: state["messages"] >= n, step.get("secs", 10), "%d messages" % n)


def op_disconnect(ctx, step):
    rc = ReasonCode(PacketTypes.DISCONNECT, identifier=step.get("reason", 0))
    props = props_from_json(PacketTypes.DISCONNECT, step.get("props"))
    ctx["client"].disconnect(reasoncode=rc, properties=props)
    wait_for(lambda: state["disconnected"] is not None, 10, "disconnect")
    ctx["client"].loop_stop()


def op_wait_disconnect(ctx, step):
    wait_for(lambda: state["disconnected"] is not None, step.get("secs", 10),
             "the server's DISCONNECT")


def op_drop(ctx, step):
    """Closes the socket without DISCONNECT (as a device losing power would)."""
    client = ctx["client"]
    sock = client.socket()
    client.loop_stop()
    if sock is not None:
        sock.close()


OPS = {
    "connect": op_connect,
    "subscribe": op_subscribe,
    "unsubscribe": op_unsubscribe,
    "publish": op_publish,
    "expect": op_expect,
    "sleep": lambda ctx, step: time.sleep(step["secs"]),
    "disconnect": op_disconnect,
    "wait_disconnect": op_wait_disconnect,
    "drop": op_drop,
    "timeout": lambda ctx, step: signal.alarm(step["secs"]),
}


def main():
    host, port, steps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    signal.signal(signal.SIGALRM, lambda *_: (emit({"event": "error", "error": "alarm"}),
                                              os._exit(3)))
    signal.alarm(30)
    ctx = {"host": host, "port": port}
    for step in steps:
        OPS[step["op"]](ctx, step)
    emit({"event": "done"})


if __name__ == "__main__":
    main()
