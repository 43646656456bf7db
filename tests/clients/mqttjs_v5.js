#!/usr/bin/env node
// An MQTT 5 client on MQTT.js (npm `mqtt`, pinned in package.json), driven by the
// end-to-end tests (tests/src/clients.rs).
//
//     node mqttjs_v5.js HOST PORT STEPS_JSON
//
// The same step language as paho_v5.py (connect, subscribe, unsubscribe, publish, expect,
// sleep, disconnect, wait_disconnect, drop, timeout), with MQTT.js's own property names
// (camelCase: userProperties, contentType, messageExpiryInterval, topicAlias, ...; a
// "<name>_hex" key gives a Buffer). Every packet the broker sends is printed on stdout as
// one JSON line; so is every PUBLISH the client writes ("sent": what went on the wire after
// MQTT.js applied its topic aliases). Every wait is bounded, and the whole run by a timer.
'use strict';

const mqtt = require('mqtt');

const [host, port, stepsJson] = process.argv.slice(2);
const steps = JSON.parse(stepsJson);
const state = { packets: [], messages: 0, connack: null, disconnected: null };
let client = null;
let alarm = setTimeout(() => fail('alarm'), 30000);

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function fail(why) {
  emit({ event: 'error', error: why });
  process.exit(3);
}

function jsonable(props) {
  const out = {};
  for (const [k, v] of Object.entries(props || {})) {
    if (Buffer.isBuffer(v)) out[k + '_hex'] = v.toString('hex');
    else out[k] = v;
  }
  return out;
}

function fromJson(spec) {
  if (!spec) return undefined;
  const out = {};
  for (const [k, v] of Object.entries(spec)) {
    if (k.endsWith('_hex')) out[k.slice(0, -4)] = Buffer.from(v, 'hex');
    else out[k] = v;
  }
  return out;
}

function payloadOf(step) {
  if (step.payload_hex !== undefined) return Buffer.from(step.payload_hex, 'hex');
  return Buffer.from(step.payload || '');
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(pred, secs, what) {
  const deadline = Date.now() + secs * 1000;
  while (!pred()) {
    if (Date.now() > deadline) {
      emit({ event: 'error', error: 'timeout waiting for ' + what });
      return false;
    }
    await sleep(10);
  }
  return true;
}

function onPacket(p) {
  state.packets.push(p);
  switch (p.cmd) {
    case 'connack':
      state.connack = p;
      emit({ event: 'connack', reason: p.reasonCode || 0, session_present: !!p.sessionPresent,
        props: jsonable(p.properties) });
      break;
    case 'suback':
      emit({ event: 'suback', mid: p.messageId, reasons: p.granted });
      break;
    case 'unsuback':
      emit({ event: 'unsuback', mid: p.messageId, reasons: p.granted || [] });
      break;
    case 'puback':
    case 'pubrec':
      emit({ event: 'puback', mid: p.messageId, reason: p.reasonCode || 0 });
      break;
    case 'disconnect':
      state.disconnected = p.reasonCode || 0;
      emit({ event: 'disconnected', reason: p.reasonCode || 0 });
      break;
    default:
  }
}

const ops = {
  async connect(step) {
    const options = {
      protocolVersion: 5,
      clientId: step.id || '',
      clean: step.clean_start !== false,
      keepalive: step.keepalive || 60,
      reconnectPeriod: 0,
      connectTimeout: 10000,
      properties: fromJson(step.props),
      autoUseTopicAlias: !!step.auto_use_topic_alias,
    };
    if (step.username !== undefined) options.username = step.username;
    if (step.password_hex !== undefined) options.password = Buffer.from(step.password_hex, 'hex');
    else if (step.password !== undefined) options.password = step.password;
    if (step.will) {
      options.will = { topic: step.will.topic, payload: payloadOf(step.will),
        qos: step.will.qos || 0, retain: !!step.will.retain, properties: fromJson(step.will.props) };
    }
    state.connack = null;
    state.disconnected = null;
    client = mqtt.connect(`mqtt://${host}:${port}`, options);
    client.on('packetreceive', onPacket);
    client.on('packetsend', (p) => {
      if (p.cmd === 'publish') {
        emit({ event: 'sent', topic: p.topic.toString(), props: jsonable(p.properties) });
      }
    });
    client.on('error', (e) => emit({ event: 'client_error', error: String(e), code: e.code }));
    client.on('close', () => { if (state.disconnected === null) state.disconnected = -1; });
    client.on('message', (topic, payload, packet) => {
      emit({ event: 'message', topic, payload: payload.toString(), payload_hex: payload.toString('hex'),
        qos: packet.qos, retain: !!packet.retain, props: jsonable(packet.properties) });
      state.messages += 1;
    });
    await waitFor(() => state.connack !== null || state.disconnected !== null, step.wait || 10,
      'CONNACK');
  },
  async subscribe(step) {
    const map = {};
    for (const f of step.filters) {
      map[f.filter] = { qos: f.qos || 0, nl: !!f.no_local, rap: !!f.retain_as_published,
        rh: f.retain_handling || 0 };
    }
    let done = false;
    client.subscribe(map, { properties: fromJson(step.props) }, (err) => {
      if (err) emit({ event: 'client_error', error: String(err) });
      done = true;
    });
    await waitFor(() => done || state.disconnected !== null, 10, 'SUBACK');
  },
  async unsubscribe(step) {
    let done = false;
    client.unsubscribe(step.filters, () => { done = true; });
    await waitFor(() => done, 10, 'UNSUBACK');
  },
  async publish(step) {
    let done = false;
    client.publish(step.topic, payloadOf(step),
      { qos: step.qos || 0, retain: !!step.retain, properties: fromJson(step.props) },
      (err) => {
        if (err && err.code === undefined) emit({ event: 'client_error', error: String(err) });
        done = true;
      });
    if ((step.qos || 0) > 0 && step.wait !== false) {
      await waitFor(() => done || state.disconnected !== null, 10, 'PUBACK');
    }
  },
  async expect(step) {
    await waitFor(() => state.messages >= step.count, step.secs || 10, `${step.count} messages`);
  },
  async sleep(step) {
    await sleep(step.secs * 1000);
  },
  async disconnect(step) {
    let done = false;
    client.end(false, { reasonCode: step.reason || 0, properties: fromJson(step.props) },
      () => { done = true; });
    await waitFor(() => done, 10, 'disconnect');
  },
  async wait_disconnect(step) {
    await waitFor(() => state.disconnected !== null, step.secs || 10, "the server's DISCONNECT");
  },
  async drop() {
    client.stream.destroy();
    await sleep(50);
  },
  async timeout(step) {
    clearTimeout(alarm);
    alarm = setTimeout(() => fail('alarm'), step.secs * 1000);
  },
};

(async () => {
  for (const step of steps) {
    await ops[step.op](step);
  }
  emit({ event: 'done' });
  process.exit(0);
})().catch((e) => fail(String(e && e.stack ? e.stack : e)));
