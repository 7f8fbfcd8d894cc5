"""moto, upstream: forwarding requests over kept-alive connections (one per thread), and the
lookups the emulator makes itself (a subnet's AZ, a launch template's type and subnet)."""

import http.client
import threading
import urllib.parse
import xml.etree.ElementTree as ET

from .wire import xml_find_text


class Upstream:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit("upstream must be http://host:port")
        self.host = u.hostname
        self.port = u.port or 80
        self.local = threading.local()
        self.subnet_az = {}  # (region, subnet) -> AZ

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.host, self.port, timeout=600)
            self.local.conn = c
        return c

    def request(self, method, path, headers, body):
        """-> (status, reason, [(k, v)], body). Retries once on a stale kept-alive socket."""
        for attempt in (0, 1):
            conn = self._conn()
            reused = conn.sock is not None
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                has_host = False
                for k, v in headers:
                    if k.lower() == "host":
                        has_host = True
                    conn.putheader(k, v)
                if not has_host:
                    conn.putheader("Host", "%s:%d" % (self.host, self.port))
                if body or method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body or b"")))
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
                hdrs = resp.getheaders()
                if resp.will_close:
                    conn.close()
                return resp.status, resp.reason, hdrs, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self.local.conn = None
                if attempt == 0 and reused:
                    continue
                raise
            except Exception:
                conn.close()
                self.local.conn = None
                raise

    def reset(self):
        """POST /moto-api/reset; returns the status, or why moto could not be reached."""
        self.subnet_az = {}
        try:
            st, _, _, _ = self.request("POST", "/moto-api/reset", [("Content-Length", "0")], b"")
        except OSError as e:
            st = "unreachable (%s)" % e
        return st

    def ec2_query(self, region, params):
        """Our own EC2 query against moto (moto does not verify signatures)."""
        body = urllib.parse.urlencode(params).encode()
        auth = (
            "AWS4-HMAC-SHA256 Credential=testing/20240101/%s/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0" % region
        )
        headers = [
            ("Host", "%s:%d" % (self.host, self.port)),
            ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
            ("Authorization", auth),
        ]
        status, _, _, data = self.request("POST", "/", headers, body)
        if status != 200:
            return None
        try:
            return ET.fromstring(data)
        except ET.ParseError:
            return None

    def az_of(self, region, subnet, placement_az=None):
        """The AZ an InsufficientInstanceCapacity message names: the placement's, the
        subnet's (asked once), or the region's first."""
        if placement_az:
            return placement_az
        if subnet:
            az = self.subnet_az.get((region, subnet))
            if az is None:
                try:
                    root = self.ec2_query(region, {
                        "Action": "DescribeSubnets", "Version": "2016-11-15",
                        "SubnetId.1": subnet})
                    az = xml_find_text(root, "subnetSet/item/availabilityZone") if root is not None else None
                except OSError:
                    az = None
                if az:
                    self.subnet_az[(region, subnet)] = az
            if az:
                return az
        return region + "a"

    def launch_template_data(self, region, params, prefix):
        """(instance type, subnet) from a launch template referenced by params[prefix.*]."""
        q = {"Action": "DescribeLaunchTemplateVersions", "Version": "2016-11-15"}
        if params.get(prefix + "LaunchTemplateId"):
            q["LaunchTemplateId"] = params[prefix + "LaunchTemplateId"]
        elif params.get(prefix + "LaunchTemplateName"):
            q["LaunchTemplateName"] = params[prefix + "LaunchTemplateName"]
        else:
            return None, None
        q["LaunchTemplateVersion.1"] = params.get(prefix + "Version") or "$Default"
        try:
            root = self.ec2_query(region, q)
        except OSError:
            return None, None
        if root is None:
            return None, None
        itype = xml_find_text(root, "launchTemplateVersionSet/item/launchTemplateData/instanceType")
        subnet = xml_find_text(
            root, "launchTemplateVersionSet/item/launchTemplateData/networkInterfaceSet/item/subnetId")
        return itype, subnet
