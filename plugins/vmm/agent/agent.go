// Package agent is the kuasar-vmm guest agent (cmd/kuasar-vmm-agent is its
// binary): PID 1 of the guest's initramfs, built by contrib/guest. It
// brings the guest up (a root pivot_root can leave, kernel file systems,
// cgroup v2, kernel modules, loopback), reaps the guest's orphans (package
// reaper), opens the virtio-serial port named guest.PortName and serves
// ttrpc over plugins/vmm/channel to the daemon: the Agent service of
// plugins/vmm/agentapi (health, clock, network, the pod: SetupSandbox, the
// streams of its processes, pod stats) and the containerd task API of the
// pod's containers (plugins/task.Service over a Runtime that runs them with
// the image's runc). See plugins/vmm/README.md for how the host calls it.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/channel"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// Config is what the binary tells the agent.
type Config struct {
	Version, Revision string
	// Started is when the process started.
	Started time.Time

	// stateDir replaces the agent's state directory (tests).
	stateDir string
	// runc replaces guest.RuncPath as it is (with its sealed copy).
	runc *runcBinary
}

// portTimeout bounds the wait for the channel's port to appear.
const portTimeout = 30 * time.Second

// Main runs the agent as PID 1. It never returns: when the agent cannot go
// on it powers the guest off (the host then sees the VM end, with the
// reason on the console), unless the kernel command line has kuasar.debug.
func Main(ctx context.Context, cfg Config) {
	err := run(ctx, cfg)
	log.G(ctx).WithError(err).Error("kuasar-vmm-agent failed")
	if guest.Params(cmdline())[guest.ParamDebug] != "" {
		log.G(ctx).Error("kuasar.debug is set: staying up for inspection")
		select {}
	}
	powerOff(ctx, false)
	select {}
}

func run(ctx context.Context, cfg Config) error {
	if err := setupSystem(ctx); err != nil {
		return err
	}
	params := guest.Params(cmdline())
	if lvl := params[guest.ParamLogLevel]; lvl != "" {
		if err := log.SetLevel(lvl); err != nil {
			log.G(ctx).WithError(err).Warn("bad log level")
		}
	}
	log.G(ctx).WithField("version", cfg.Version).WithField("uptime", uptime()).Info("kuasar-vmm-agent starting")

	list, err := readModules(guest.ModulesList)
	if err != nil {
		return err
	}
	mods := newModules(list)
	if err := mods.loadEarly(ctx); err != nil {
		return err
	}
	if ch := params[guest.ParamChannel]; ch != "" && ch != "serial" {
		return fmt.Errorf("channel %q is not supported by this agent (only serial)", ch)
	}
	dev, err := waitPort(ctx, "/sys/class/virtio-ports", guest.PortName, portTimeout)
	if err != nil {
		return err
	}
	port, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening the channel port: %w", err)
	}

	r := reaper.New()
	go r.Run(ctx)
	cfg.runc = sealRunc(guest.RuncPath)
	a, err := newAgent(ctx, cfg, mods, r)
	if err != nil {
		return err
	}
	l := channel.Listen(port, channel.WithHello(a.channelHello(), 0), channel.WithPath(dev))
	go mods.loadLate(ctx)
	go cfg.runc.seal(ctx) // off the boot's path: runc calls wait for it

	srv, err := ttrpc.NewServer(unixsock.CallInterceptor("kuasar-vmm-agent"))
	if err != nil {
		return err
	}
	register(srv, a)
	log.G(ctx).WithField("port", dev).WithField("uptime", uptime()).Info("kuasar-vmm-agent serving")
	if err := srv.Serve(ctx, l); err != nil {
		return fmt.Errorf("serving: %w", err)
	}
	return errors.New("the server stopped")
}

// waitPort waits for the virtio-serial port named name to appear in dir
// (/sys/class/virtio-ports) and in /dev: its driver probes it
// asynchronously after the module loads.
func waitPort(ctx context.Context, dir, name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		dev, err := findPort(dir, name)
		if err == nil {
			if _, err = os.Stat(dev); err == nil {
				return dev, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q after %s (is the VM started with virtserialport,name=%s?)", name, timeout, name)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func cmdline() string {
	b, _ := os.ReadFile("/proc/cmdline")
	return string(b)
}

// uptime is the guest's time since boot.
func uptime() time.Duration {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	var s float64
	if _, err := fmt.Sscanf(string(b), "%f", &s); err != nil {
		return 0
	}
	return time.Duration(s * float64(time.Second)).Round(time.Millisecond)
}
