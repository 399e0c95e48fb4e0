"""Introspection XML in sd-bus's format, for `--bus-introspect` (no bus needed)."""

from __future__ import annotations

from .objects import CONST, Interface

DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    '"https://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)

STANDARD = """ <interface name="org.freedesktop.DBus.Peer">
  <method name="Ping"/>
  <method name="GetMachineId">
   <arg type="s" name="machine_uuid" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Introspectable">
  <method name="Introspect">
   <arg name="xml_data" type="s" direction="out"/>
  </method>
 </interface>
 <interface name="org.freedesktop.DBus.Properties">
  <method name="Get">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="property_name" direction="in" type="s"/>
   <arg name="value" direction="out" type="v"/>
  </method>
  <method name="GetAll">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="props" direction="out" type="a{sv}"/>
  </method>
  <method name="Set">
   <arg name="interface_name" direction="in" type="s"/>
   <arg name="property_name" direction="in" type="s"/>
   <arg name="value" direction="in" type="v"/>
  </method>
  <signal name="PropertiesChanged">
   <arg type="s" name="interface_name"/>
   <arg type="a{sv}" name="changed_properties"/>
   <arg type="as" name="invalidated_properties"/>
  </signal>
 </interface>
"""

PRIVILEGED = '   <annotation name="org.freedesktop.systemd1.Privileged" value="true"/>\n'


def _split_signature(sig: str) -> list[str]:
    """Split a D-Bus signature into its complete types."""
    out, i = [], 0
    while i < len(sig):
        j = i
        while sig[j] == "a":
            j += 1
        if sig[j] in "({":
            depth, k = 0, j
            while True:
                depth += sig[k] in "({"
                depth -= sig[k] in ")}"
                k += 1
                if depth == 0:
                    break
            j = k
        else:
            j += 1
        out.append(sig[i:j])
        i = j
    return out


def _args(sig: str, names: tuple[str, ...], direction: str | None) -> str:
    lines = []
    for i, t in enumerate(_split_signature(sig)):
        name = f' name="{names[i]}"' if i < len(names) else ""
        d = f' direction="{direction}"' if direction else ""
        lines.append(f'   <arg type="{t}"{name}{d}/>\n')
    return "".join(lines)


def interface_xml(iface: Interface) -> str:
    """Properties, then methods, then signals: 252's order (bus/libsdbus.order_members_as_252)."""
    out = [f' <interface name="{iface.name}">\n']
    for p in iface.properties:
        if p.hidden:
            continue
        access = "readwrite" if p.setter else "read"
        out.append(f'  <property name="{p.name}" type="{p.sig}" access="{access}">\n')
        emits = "const" if p.emits == CONST else "false"
        out.append('   <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" '
                   f'value="{emits}"/>\n')
        if p.setter:
            out.append(PRIVILEGED)
        out.append("  </property>\n")
    for m in iface.methods:
        out.append(f'  <method name="{m.name}">\n')
        out.append(_args(m.in_sig, m.in_names, "in"))
        out.append(_args(m.out_sig, m.out_names, "out"))
        if m.privileged:
            out.append(PRIVILEGED)
        out.append("  </method>\n")
    for s in iface.signals:
        out.append(f'  <signal name="{s.name}">\n')
        out.append(_args(s.sig, s.names, None))
        out.append("  </signal>\n")
    out.append(" </interface>\n")
    return "".join(out)


def node_xml(iface: Interface, children: list[str]) -> str:
    body = "".join(f' <node name="{c}"/>\n' for c in children)
    return DOCTYPE + "<node>\n" + STANDARD + interface_xml(iface) + body + "</node>\n"
