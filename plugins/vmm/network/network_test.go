package network

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// newNetns makes a network namespace pinned at a file of the test, and
// removes it at the end.
func newNetns(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "netns")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, "")
	}()
	if err := <-errc; err != nil {
		t.Fatalf("new network namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			t.Errorf("unmounting %s: %v", path, err)
		}
	})
	return path
}

func handle(t *testing.T, path string) (*netlink.Handle, netns.NsHandle) {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h, ns
}

// podNetwork makes what CNI would: a pod namespace whose eth0 is a veth
// to a peer namespace (standing for the node's bridge).
func podNetwork(t *testing.T) (podPath string, pod, peer *netlink.Handle) {
	podPath = newNetns(t)
	peerPath := newNetns(t)
	pod, _ = handle(t, podPath)
	peer, peerNs := handle(t, peerPath)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1450}, PeerName: "peer0", PeerNamespace: netlink.NsFd(peerNs)}
	if err := pod.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	setup := func(h *netlink.Handle, name, addr string) {
		l, err := h.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		a, _ := netlink.ParseAddr(addr)
		if err := h.AddrAdd(l, a); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	setup(pod, "eth0", "10.99.0.2/24")
	setup(peer, "peer0", "10.99.0.1/24")
	eth, _ := pod.LinkByName("eth0")
	if err := pod.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.ParseIP("10.99.0.1")}); err != nil {
		t.Fatal(err)
	}
	return podPath, pod, peer
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, taps)")
	}
}

func TestAttach(t *testing.T) {
	needRoot(t)
	ctx := context.Background()
	podPath, pod, peer := podNetwork(t)
	att, err := Attach(ctx, podPath, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	defer att.Tap.Close()

	eth, _ := pod.LinkByName("eth0")
	ifc := att.Interface
	if ifc.Name != "eth0" || ifc.MAC != eth.Attrs().HardwareAddr.String() || ifc.MTU != 1450 {
		t.Errorf("interface %+v", ifc)
	}
	if len(ifc.Addrs) != 1 || ifc.Addrs[0] != netip.MustParsePrefix("10.99.0.2/24") {
		t.Errorf("addresses %v", ifc.Addrs)
	}
	var dflt, subnet bool
	for _, r := range ifc.Routes {
		dflt = dflt || !r.Dst.IsValid() && r.Gateway == netip.MustParseAddr("10.99.0.1")
		subnet = subnet || r.Dst == netip.MustParsePrefix("10.99.0.0/24") && r.Link && r.Kernel
	}
	if !dflt || !subnet {
		t.Errorf("routes %+v", ifc.Routes)
	}
	req := SetupRequest(ifc)
	if len(req.Interfaces) != 1 || req.Interfaces[0].Mac != ifc.MAC || req.Interfaces[0].Addresses[0] != "10.99.0.2/24" ||
		len(req.Routes) != 1 || req.Routes[0].Gateway != "10.99.0.1" || req.Routes[0].Destination != "" || req.Routes[0].Device != "eth0" {
		t.Errorf("agent request %v", req)
	}
	tap, err := pod.LinkByName(att.TapName)
	if err != nil {
		t.Fatal(err)
	}
	if tap.Attrs().MTU != 1450 || tap.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("tap %+v", tap.Attrs())
	}
	for _, l := range []netlink.Link{eth, tap} {
		fs, err := pod.FilterList(l, netlink.MakeHandle(0xffff, 0))
		if err != nil || len(fs) != 1 {
			t.Errorf("filters on %s: %v %v", l.Attrs().Name, fs, err)
		}
	}

	// The guest's side: an ARP request for the peer, written to the tap
	// with eth0's MAC, reaches the peer through eth0, and its answer comes
	// back through the tap.
	peerLink, _ := peer.LinkByName("peer0")
	if err := arpExchange(t, att.Tap, eth.Attrs().HardwareAddr, peerLink.Attrs().HardwareAddr); err != nil {
		t.Fatal(err)
	}

	if err := Detach(ctx, podPath, "eth0"); err != nil {
		t.Fatal(err)
	}
	if qs, _ := pod.QdiscList(eth); hasIngress(qs) {
		t.Error("ingress qdisc left on eth0")
	}
	att.Tap.Close()
	if _, err := pod.LinkByName(att.TapName); err == nil {
		t.Error("tap left after Detach")
	}
	if err := Detach(ctx, podPath, "eth0"); err != nil {
		t.Errorf("second Detach: %v", err)
	}
}

func TestAttachMissing(t *testing.T) {
	needRoot(t)
	podPath := newNetns(t)
	if _, err := Attach(context.Background(), podPath, "eth0"); err == nil {
		t.Fatal("attached to a missing interface")
	}
	h, _ := handle(t, podPath)
	if _, err := h.LinkByName(TapName("eth0")); err == nil {
		t.Error("tap left after a failed Attach")
	}
	if _, err := Attach(context.Background(), "/nonexistent/netns", "eth0"); err == nil {
		t.Error("attached in a missing namespace")
	}
}

func hasIngress(qs []netlink.Qdisc) bool {
	for _, q := range qs {
		if q.Type() == "ingress" {
			return true
		}
	}
	return false
}

// arpExchange writes an ARP request for 10.99.0.1 from 10.99.0.2 (mac)
// to the tap, and waits for the reply from peerMAC.
func arpExchange(t *testing.T, tap *os.File, mac, peerMAC net.HardwareAddr) error {
	t.Helper()
	const vnetHdr = 10 // struct virtio_net_hdr, IFF_VNET_HDR
	var f bytes.Buffer
	f.Write(make([]byte, vnetHdr))
	f.Write([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Write(mac)
	binary.Write(&f, binary.BigEndian, uint16(0x0806))      // ARP
	binary.Write(&f, binary.BigEndian, []uint16{1, 0x0800}) // Ethernet, IPv4
	f.Write([]byte{6, 4})                                   // sizes
	binary.Write(&f, binary.BigEndian, uint16(1))           // request
	f.Write(mac)
	f.Write(net.ParseIP("10.99.0.2").To4())
	f.Write(make([]byte, 6))
	f.Write(net.ParseIP("10.99.0.1").To4())
	deadline := time.Now().Add(10 * time.Second)
	buf := make([]byte, 2048)
	for time.Now().Before(deadline) {
		if _, err := tap.Write(f.Bytes()); err != nil {
			return err
		}
		tap.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, err := tap.Read(buf)
			if err != nil {
				break // resend
			}
			fr := buf[vnetHdr:n]
			if len(fr) >= 42 && binary.BigEndian.Uint16(fr[12:]) == 0x0806 && binary.BigEndian.Uint16(fr[20:]) == 2 &&
				bytes.Equal(fr[22:28], peerMAC) && bytes.Equal(fr[0:6], mac) {
				return nil
			}
		}
	}
	t.Fatal("no ARP reply from the peer through the tap")
	return nil
}
