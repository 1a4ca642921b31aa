// Package network gives a kuasar-vmm guest the pod's network. CRI and CNI
// make the pod's network namespace with a veth (eth0) holding the pod's IP;
// a VM cannot use a veth, so this package adds a tap device in that
// namespace for the guest's NIC and joins the two with tc: an ingress qdisc
// on each, whose one filter (u32, matching everything) redirects every
// frame to the other's egress (mirred egress redirect). The guest's NIC
// takes eth0's MAC, addresses and routes (the agent applies them), so to
// the rest of the pod network the guest is eth0; eth0 keeps its addresses
// for CNI, and its stack never sees a frame.
//
// The tap is opened here and its file handed to the hypervisor (QEMU gets
// it over QMP, hypervisor.NIC.TapFD); it is not persistent, so it goes away
// with the last process holding it: a VM that dies leaves no tap behind.
package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// Interface is a network interface of the pod, as the guest must set it
// up.
type Interface struct {
	Name   string         `json:"name"` // in the pod namespace: eth0
	MAC    string         `json:"mac"`
	MTU    int            `json:"mtu"`
	Addrs  []netip.Prefix `json:"addrs"`
	Routes []Route        `json:"routes,omitempty"`
}

// Route is a route through an interface.
type Route struct {
	// Dst is the destination; invalid (zero) for the default route.
	Dst     netip.Prefix `json:"dst,omitzero"`
	Gateway netip.Addr   `json:"gateway,omitzero"`
	Src     netip.Addr   `json:"src,omitzero"`
	// Link is set for a route on the link (no gateway, scope link); Kernel
	// for one the kernel adds by itself with an address (the guest's
	// kernel adds it too).
	Link   bool `json:"link,omitempty"`
	Kernel bool `json:"kernel,omitempty"`
	Metric int  `json:"metric,omitempty"`
}

// Attachment is a tap joined to a pod interface.
type Attachment struct {
	// Interface is what the guest's NIC must look like.
	Interface Interface
	// TapName is the tap's name in the pod namespace.
	TapName string
	// Tap is the open tap device (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR), to hand
	// to the hypervisor; close it once the hypervisor holds its own.
	Tap *os.File
}

// TapName is the tap's name for a pod interface.
func TapName(ifname string) string {
	n := "tap_" + ifname
	if len(n) > unix.IFNAMSIZ-1 {
		n = n[:unix.IFNAMSIZ-1]
	}
	return n
}

// Attach adds a tap for the pod interface ifname in the network namespace
// at nsPath and joins them. On error it leaves nothing behind.
func Attach(ctx context.Context, nsPath, ifname string) (_ *Attachment, retErr error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("pod network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer h.Close()

	eth, err := h.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("pod interface %s in %s: %v: %w", ifname, nsPath, err, errdefs.ErrNotFound)
	}
	iface, err := describe(h, eth)
	if err != nil {
		return nil, err
	}
	tapName := TapName(ifname)
	tap, err := openTap(ns, tapName)
	if err != nil {
		return nil, fmt.Errorf("tap %s in %s: %w", tapName, nsPath, err)
	}
	defer func() {
		if retErr != nil {
			tap.Close() // the tap is not persistent: it goes with its file
			_ = removeRedirect(h, eth)
		}
	}()
	tl, err := h.LinkByName(tapName)
	if err != nil {
		return nil, err
	}
	if err := h.LinkSetMTU(tl, eth.Attrs().MTU); err != nil {
		return nil, fmt.Errorf("tap mtu: %w", err)
	}
	if err := h.LinkSetUp(tl); err != nil {
		return nil, fmt.Errorf("tap up: %w", err)
	}
	if err := redirect(h, eth, tl); err != nil {
		return nil, fmt.Errorf("%s -> %s: %w", ifname, tapName, err)
	}
	if err := redirect(h, tl, eth); err != nil {
		return nil, fmt.Errorf("%s -> %s: %w", tapName, ifname, err)
	}
	log.G(ctx).WithField("netns", nsPath).WithField("interface", ifname).WithField("tap", tapName).Debug("tap joined to the pod interface")
	return &Attachment{Interface: iface, TapName: tapName, Tap: tap}, nil
}

// Detach undoes Attach: it removes the redirection from the pod interface,
// and the tap if something still holds it open persistently. Whatever is
// already gone is fine.
func Detach(ctx context.Context, nsPath, ifname string) error {
	ns, err := netns.GetFromPath(nsPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	var errs []error
	if eth, err := h.LinkByName(ifname); err == nil {
		errs = append(errs, removeRedirect(h, eth))
	}
	if tl, err := h.LinkByName(TapName(ifname)); err == nil {
		errs = append(errs, h.LinkDel(tl))
	}
	return errors.Join(errs...)
}

// describe reads what the guest needs of a pod interface.
func describe(h *netlink.Handle, l netlink.Link) (Interface, error) {
	a := l.Attrs()
	iface := Interface{Name: a.Name, MAC: a.HardwareAddr.String(), MTU: a.MTU}
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return iface, fmt.Errorf("addresses of %s: %w", a.Name, err)
	}
	for _, ad := range addrs {
		if ad.IP.IsLinkLocalUnicast() {
			continue // the guest makes its own
		}
		if p, ok := prefixOf(ad.IPNet); ok {
			iface.Addrs = append(iface.Addrs, p)
		}
	}
	routes, err := h.RouteList(l, netlink.FAMILY_ALL)
	if err != nil {
		return iface, fmt.Errorf("routes of %s: %w", a.Name, err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.IP.IsLinkLocalUnicast() || r.Table != unix.RT_TABLE_MAIN && r.Table != 0 {
			continue
		}
		rt := Route{Link: r.Scope == netlink.SCOPE_LINK, Kernel: r.Protocol == unix.RTPROT_KERNEL, Metric: r.Priority}
		if r.Dst != nil {
			if p, ok := prefixOf(r.Dst); ok && p.Bits() > 0 {
				rt.Dst = p.Masked()
			}
		}
		rt.Gateway, _ = netip.AddrFromSlice(r.Gw)
		rt.Gateway = rt.Gateway.Unmap()
		rt.Src, _ = netip.AddrFromSlice(r.Src)
		rt.Src = rt.Src.Unmap()
		iface.Routes = append(iface.Routes, rt)
	}
	return iface, nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

// redirect sends every frame arriving on from out of to.
func redirect(h *netlink.Handle, from, to netlink.Link) error {
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: from.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS,
	}}
	if err := h.QdiscReplace(q); err != nil {
		return fmt.Errorf("ingress qdisc on %s: %w", from.Attrs().Name, err)
	}
	mirred := netlink.NewMirredAction(to.Attrs().Index)
	mirred.MirredAction = netlink.TCA_EGRESS_REDIR
	f := &netlink.U32{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: from.Attrs().Index, Parent: netlink.MakeHandle(0xffff, 0), Priority: 1, Protocol: unix.ETH_P_ALL,
		},
		// One key that matches everything: mask 0.
		Sel:     &netlink.TcU32Sel{Flags: netlink.TC_U32_TERMINAL, Nkeys: 1, Keys: []netlink.TcU32Key{{Mask: 0, Val: 0}}},
		Actions: []netlink.Action{mirred},
	}
	if err := h.FilterReplace(f); err != nil {
		return fmt.Errorf("redirect filter on %s (needs cls_u32 and act_mirred): %w", from.Attrs().Name, err)
	}
	return nil
}

// removeRedirect drops a link's ingress qdisc (and its filter with it).
func removeRedirect(h *netlink.Handle, l netlink.Link) error {
	q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS,
	}}
	if err := h.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("ingress qdisc of %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// openTap creates a tap named name in ns and returns its file. A tap is
// created in the network namespace of the thread that opens it, so this
// runs on a thread of its own that enters ns, and that thread is retired
// if it cannot return to the daemon's namespace.
func openTap(ns netns.NsHandle, name string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			ch <- result{nil, fmt.Errorf("entering the pod network namespace: %w", err)}
			return
		}
		f, err := createTap(name)
		if err := netns.Set(orig); err == nil {
			runtime.UnlockOSThread()
		} // else: the goroutine ends locked, and its thread with it
		ch <- result{f, err}
	}()
	r := <-ch
	return r.f, r.err
}

// createTap opens /dev/net/tun as a new tap device in the current
// thread's network namespace.
func createTap(name string) (*os.File, error) {
	// Non-blocking: the daemon can poll it (and QEMU sets it so anyway).
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// SetupRequest is the agent call that gives the guest's NICs the pod
// interfaces' addresses and routes (each NIC found by its MAC, which the
// hypervisor gave it from the interface). Routes the kernel adds by itself
// with an address are left to the guest's kernel.
func SetupRequest(ifaces ...Interface) *agentapi.SetupNetworkRequest {
	req := &agentapi.SetupNetworkRequest{}
	for _, ifc := range ifaces {
		ai := &agentapi.Interface{Mac: ifc.MAC, Name: ifc.Name, Mtu: uint32(ifc.MTU)}
		for _, a := range ifc.Addrs {
			ai.Addresses = append(ai.Addresses, a.String())
		}
		req.Interfaces = append(req.Interfaces, ai)
		for _, r := range ifc.Routes {
			if r.Kernel {
				continue
			}
			ar := &agentapi.Route{Device: ifc.Name, Link: r.Link, Metric: uint32(r.Metric)}
			if r.Dst.IsValid() {
				ar.Destination = r.Dst.String()
			}
			if r.Gateway.IsValid() {
				ar.Gateway = r.Gateway.String()
			}
			if r.Src.IsValid() {
				ar.Source = r.Src.String()
			}
			req.Routes = append(req.Routes, ar)
		}
	}
	return req
}
