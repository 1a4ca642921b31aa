//go:build e2e

package integration

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/network"
)

// TestVMMNetwork gives a booted VM the network of a pod the way the
// controller will: a tap in the pod's namespace joined to its eth0
// (plugins/vmm/network), plugged into the running VM over QMP (PCIe
// hotplug, as a template clone gets its NIC), addresses and routes set by
// the agent. A peer namespace standing for the node's bridge pings the
// guest at the pod's IP. Stopping the VM leaves no tap.
func TestVMMNetwork(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skipf("skipping the microVM network test: qemu-system-x86_64 is not installed: %v", err)
	}
	img := guestImage(t)
	accel, err := hypervisor.ResolveAccel("auto", hypervisor.KVMUsable())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	pod, peer := "kvt-pod-"+randHex(4), "kvt-peer-"+randHex(4)
	for _, ns := range []string{pod, peer} {
		ns := ns
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	run(t, "ip", "-n", pod, "link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "peer0", "netns", peer)
	run(t, "ip", "-n", pod, "addr", "add", "10.98.0.2/24", "dev", "eth0")
	run(t, "ip", "-n", peer, "addr", "add", "10.98.0.1/24", "dev", "peer0")
	run(t, "ip", "-n", pod, "link", "set", "eth0", "up")
	run(t, "ip", "-n", peer, "link", "set", "peer0", "up")
	run(t, "ip", "-n", pod, "route", "add", "default", "via", "10.98.0.1")
	podPath, peerPath := "/var/run/netns/"+pod, "/var/run/netns/"+peer

	b := bootVM(ctx, t, img, accel, 128, 32)
	att, err := network.Attach(ctx, podPath, "eth0")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = b.vm.AddNIC(ctx, hypervisor.NIC{ID: "nic0", MAC: att.Interface.MAC, TapFD: att.Tap.Fd()})
	att.Tap.Close() // QEMU holds its own
	if err != nil {
		t.Fatalf("AddNIC: %v%s", err, b.logs())
	}
	added := time.Since(start)
	if _, err := b.agent.SetupNetwork(ctx, network.SetupRequest(att.Interface)); err != nil {
		t.Fatalf("SetupNetwork: %v%s", err, b.logs())
	}
	t.Logf("NIC hotplugged (QMP) in %v, seen and configured by the guest %v later", added.Round(time.Millisecond), (time.Since(start) - added).Round(time.Millisecond))
	rtt, err := ping(peerPath, "10.98.0.2", 30*time.Second)
	if err != nil {
		t.Fatalf("ping from the peer to the guest: %v%s", err, b.logs())
	}
	t.Logf("the guest answers at the pod's IP (ping %v)", rtt)

	if err := b.vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	b.cleanupAndCheck(t)
	if out, err := exec.Command("ip", "-n", pod, "link", "show", att.TapName).CombinedOutput(); err == nil {
		t.Errorf("tap left after the VM stopped: %s", out)
	}
	if err := network.Detach(ctx, podPath, "eth0"); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "exec", pod, "tc", "qdisc", "show", "dev", "eth0", "ingress").CombinedOutput(); strings.Contains(string(out), "ingress") {
		t.Errorf("ingress qdisc left on eth0: %s", out)
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// ping sends ICMP echo requests to ip from the network namespace at nsPath
// until one is answered or the time is up.
func ping(nsPath, ip string, within time.Duration) (time.Duration, error) {
	type result struct {
		rtt time.Duration
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends in the namespace
		ns, err := os.Open(nsPath)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: err}
			return
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer unix.Close(fd)
		tv := unix.NsecToTimeval(int64(200 * time.Millisecond))
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		dst := &unix.SockaddrInet4{}
		copy(dst.Addr[:], net.ParseIP(ip).To4())
		deadline := time.Now().Add(within)
		buf := make([]byte, 1500)
		for seq := uint16(1); time.Now().Before(deadline); seq++ {
			msg := []byte{8, 0, 0, 0, 0x4b, 0x56, byte(seq >> 8), byte(seq), 'k', 'u', 'a', 's', 'a', 'r'}
			binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
			sent := time.Now()
			if err := unix.Sendto(fd, msg, 0, dst); err != nil {
				ch <- result{err: err}
				return
			}
			for time.Since(sent) < time.Second {
				n, _, err := unix.Recvfrom(fd, buf, 0)
				if err != nil {
					break
				}
				// An IPv4 header, then the ICMP echo reply (type 0) to ours.
				if n < 20 {
					continue
				}
				hl := int(buf[0]&0x0f) * 4
				if n >= hl+8 && buf[hl] == 0 && buf[hl+4] == 0x4b && buf[hl+5] == 0x56 && net.IP(buf[12:16]).String() == ip {
					ch <- result{rtt: time.Since(sent)}
					return
				}
			}
		}
		ch <- result{err: fmt.Errorf("no echo reply from %s in %v", ip, within)}
	}()
	r := <-ch
	return r.rtt, r.err
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
