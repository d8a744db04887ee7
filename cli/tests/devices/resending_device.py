"""A device independent of Dataviz: paho-mqtt, MQTT 3.1.1, QoS 1 (or --qos), a persistent session.

Publishes numbered readings (the `seq` tag holds the number, `ts` is 2024-01-01 plus that many
milliseconds, as common::numbered_reading) at a steady rate to gateways/<gateway>/dev-<n % 20>.
When the broker goes away, paho keeps what it could not send and, on reconnect, sends again
what was in flight (DUP flag, same packet id): what a real device does. Writes the numbers the
broker acknowledged to --acked (PUBACK, or PUBCOMP at QoS 2), one per line, and exits 0 once
all are acknowledged (1 if not within --timeout seconds).

Usage: resending_device.py --port P --user U --password W --gateway G --messages N --rate R
                           --acked FILE [--timeout S] [--qos 1|2]
"""

import argparse
import datetime
import sys
import time

import paho.mqtt.client as mqtt

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def reading(i):
    ts = START + datetime.timedelta(milliseconds=i)
    return (
        '{"d": [{"tag": "seq", "value": %d}, {"tag": "AI.0", "value": %d.5}, '
        '{"tag": "DI.0", "value": %s}], "ts": "%s"}'
        % (i, i % 97, "true" if i % 2 == 0 else "false", ts.isoformat())
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--gateway", type=int, required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--acked", required=True)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--qos", type=int, choices=[1, 2], default=1)
    args = parser.parse_args()

    # paho's callbacks run on its network thread holding its lock: they only append here.
    acked_mids = []
    connects = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="resending-device-%d" % args.gateway,
        clean_session=False,
        protocol=mqtt.MQTTv311,
    )
    client.username_pw_set(args.user, args.password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)  # no limit: nothing dropped while the broker is away
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    client.on_publish = lambda c, u, mid, rc, props: acked_mids.append(mid)
    client.on_connect = lambda c, u, flags, rc, props: connects.append(str(rc))
    client.connect_async("127.0.0.1", args.port, keepalive=10)
    client.loop_start()

    deadline = time.monotonic() + args.timeout
    while not connects:
        if time.monotonic() > deadline:
            sys.exit("no connection to the broker")
        time.sleep(0.05)

    mid_of = []
    started = time.monotonic()
    for i in range(args.messages):
        # Paced from the start, so a pause (a broker away) is followed by a catch-up burst.
        wait = started + i / args.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        info = client.publish(
            "gateways/%d/dev-%d" % (args.gateway, i % 20), reading(i), qos=args.qos
        )
        mid_of.append(info.mid)

    # Packet ids are the client's own and unique within this run (fewer than 65,535).
    while len(set(acked_mids)) < args.messages and time.monotonic() < deadline:
        time.sleep(0.2)
    acked = set(acked_mids)
    numbers = [i for i, mid in enumerate(mid_of) if mid in acked]
    with open(args.acked, "w") as out:
        out.write("".join("%d\n" % i for i in numbers))
    client.disconnect()
    client.loop_stop()
    print(
        "device: %d published, %d acknowledged, %d connections (%s)"
        % (args.messages, len(numbers), len(connects), ", ".join(connects))
    )
    sys.exit(0 if len(numbers) == args.messages else 1)


if __name__ == "__main__":
    main()
