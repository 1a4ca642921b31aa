package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
)

// SetupNetwork gives the guest's NICs the pod's addresses and routes.
func (a *agent) SetupNetwork(ctx context.Context, req *agentapi.SetupNetworkRequest) (*agentapi.SetupNetworkResponse, error) {
	if err := a.mods.wait(ctx); err != nil { // virtio_net is a late module
		return nil, err
	}
	links := map[string]netlink.Link{}
	for _, ifc := range req.Interfaces {
		l, err := setupInterface(ctx, ifc)
		if err != nil {
			return nil, err
		}
		links[l.Attrs().Name] = l
	}
	for _, r := range req.Routes {
		if err := addRoute(r, links); err != nil {
			return nil, err
		}
	}
	return &agentapi.SetupNetworkResponse{}, nil
}

func setupInterface(ctx context.Context, ifc *agentapi.Interface) (netlink.Link, error) {
	mac, err := net.ParseMAC(ifc.Mac)
	if err != nil {
		return nil, fmt.Errorf("interface %q: mac %q: %v: %w", ifc.Name, ifc.Mac, err, errdefs.ErrInvalidArgument)
	}
	var addrs []*netlink.Addr
	for _, s := range ifc.Addresses {
		ad, err := netlink.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("interface %q: address %q: %v: %w", ifc.Name, s, err, errdefs.ErrInvalidArgument)
		}
		// Usable at once: no duplicate address detection for IPv6 (the
		// address is the pod's, CNI checked it).
		ad.Flags |= unix.IFA_F_NODAD
		addrs = append(addrs, ad)
	}
	l, err := waitLinkByMAC(ctx, mac)
	if err != nil {
		return nil, err
	}
	if ifc.Name != "" && l.Attrs().Name != ifc.Name {
		if err := netlink.LinkSetDown(l); err != nil {
			return nil, fmt.Errorf("%s down: %w", l.Attrs().Name, err)
		}
		if err := netlink.LinkSetName(l, ifc.Name); err != nil {
			return nil, fmt.Errorf("renaming %s to %s: %w", l.Attrs().Name, ifc.Name, err)
		}
		if l, err = netlink.LinkByIndex(l.Attrs().Index); err != nil {
			return nil, err
		}
	}
	if ifc.Mtu > 0 && l.Attrs().MTU != int(ifc.Mtu) {
		if err := netlink.LinkSetMTU(l, int(ifc.Mtu)); err != nil {
			return nil, fmt.Errorf("%s mtu %d: %w", ifc.Name, ifc.Mtu, err)
		}
	}
	old, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, o := range old {
		if o.IP.IsLinkLocalUnicast() || hasAddr(addrs, o) {
			continue
		}
		if err := netlink.AddrDel(l, &o); err != nil {
			return nil, fmt.Errorf("%s: removing %s: %w", ifc.Name, o.IPNet, err)
		}
	}
	for _, ad := range addrs {
		if err := netlink.AddrReplace(l, ad); err != nil {
			return nil, fmt.Errorf("%s: address %s: %w", ifc.Name, ad.IPNet, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("%s up: %w", ifc.Name, err)
	}
	log.G(ctx).WithField("interface", l.Attrs().Name).WithField("addresses", ifc.Addresses).Debug("interface set up")
	return l, nil
}

func hasAddr(list []*netlink.Addr, a netlink.Addr) bool {
	for _, b := range list {
		if b.IPNet.String() == a.IPNet.String() {
			return true
		}
	}
	return false
}

// waitLinkByMAC finds the NIC with mac, waiting for one being hotplugged
// (until ctx is done).
func waitLinkByMAC(ctx context.Context, mac net.HardwareAddr) (netlink.Link, error) {
	for {
		links, err := netlink.LinkList()
		if err != nil {
			return nil, err
		}
		for _, l := range links {
			if bytes.Equal(l.Attrs().HardwareAddr, mac) {
				return l, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no network interface with MAC %s in the guest: %w", mac, errors.Join(ctx.Err(), errdefs.ErrNotFound))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func addRoute(r *agentapi.Route, links map[string]netlink.Link) error {
	l, ok := links[r.Device]
	if !ok {
		var err error
		if l, err = netlink.LinkByName(r.Device); err != nil {
			return fmt.Errorf("route %v: device %q: %v: %w", r, r.Device, err, errdefs.ErrInvalidArgument)
		}
	}
	rt := &netlink.Route{LinkIndex: l.Attrs().Index, Priority: int(r.Metric)}
	if r.Destination != "" {
		_, dst, err := net.ParseCIDR(r.Destination)
		if err != nil {
			return fmt.Errorf("route destination %q: %v: %w", r.Destination, err, errdefs.ErrInvalidArgument)
		}
		rt.Dst = dst
	}
	for _, ip := range []struct {
		s   string
		dst *net.IP
	}{{r.Gateway, &rt.Gw}, {r.Source, &rt.Src}} {
		if ip.s == "" {
			continue
		}
		if *ip.dst = net.ParseIP(ip.s); *ip.dst == nil {
			return fmt.Errorf("route %v: bad address %q: %w", r, ip.s, errdefs.ErrInvalidArgument)
		}
	}
	if r.Link {
		rt.Scope = netlink.SCOPE_LINK
	}
	if rt.Dst == nil && rt.Gw != nil && rt.Gw.To4() == nil {
		rt.Family = netlink.FAMILY_V6
	}
	if err := netlink.RouteReplace(rt); err != nil {
		return fmt.Errorf("route %v: %w", r, err)
	}
	return nil
}
