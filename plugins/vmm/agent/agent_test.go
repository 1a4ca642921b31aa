package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

func TestParseMeminfo(t *testing.T) {
	total, avail := parseMeminfo([]byte("MemTotal:         120000 kB\nMemFree: 1 kB\nMemAvailable:      60000 kB\nbad\n"))
	if total != 120000*1024 || avail != 60000*1024 {
		t.Errorf("%d %d", total, avail)
	}
}

func TestFindPort(t *testing.T) {
	dir := t.TempDir()
	for name, port := range map[string]string{"vport0p1": "org.qemu.guest_agent.0", "vport0p2": guest.PortName} {
		os.MkdirAll(filepath.Join(dir, name), 0o755)
		os.WriteFile(filepath.Join(dir, name, "name"), []byte(port+"\n"), 0o644)
	}
	dev, err := findPort(dir, guest.PortName)
	if err != nil || dev != "/dev/vport0p2" {
		t.Fatalf("findPort = %q, %v", dev, err)
	}
	if _, err := findPort(dir, "nope"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing port: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := waitPort(ctx, dir, "nope", 20*time.Millisecond); err == nil {
		t.Error("waitPort found a missing port")
	}
}

func TestModules(t *testing.T) {
	var loaded []string
	m := newModules([]guest.Module{{Path: "a.ko", Early: true}, {Path: "b.ko"}, {Path: "bad.ko"}, {Path: "c.ko"}})
	m.root = "/m"
	m.load = func(p string) error {
		loaded = append(loaded, p)
		if filepath.Base(p) == "bad.ko" {
			return errors.New("exec format error")
		}
		return nil
	}
	ctx := context.Background()
	if err := m.loadEarly(ctx); err != nil {
		t.Fatal(err)
	}
	if ready, _ := m.status(); ready {
		t.Error("ready before the late modules")
	}
	m.loadLate(ctx)
	ready, errs := m.status()
	if !ready || len(errs) != 1 || len(loaded) != 4 || loaded[0] != "/m/a.ko" {
		t.Errorf("ready %v, errors %v, loaded %v", ready, errs, loaded)
	}
	if err := m.wait(ctx); err != nil {
		t.Error(err)
	}
}

func TestService(t *testing.T) {
	ctx := context.Background()
	mods := newModules(nil)
	close(mods.done)
	a, err := newAgent(ctx, Config{Version: "v1", Revision: "r", Started: time.Unix(100, 0), stateDir: t.TempDir()}, mods, reaper.New())
	if err != nil {
		t.Fatal(err)
	}
	var set time.Time
	a.setClock = func(t time.Time) error { set = t; return nil }
	powered := make(chan bool, 1)
	a.powerOff = func(reboot bool) { powered <- reboot }
	runc := filepath.Join(t.TempDir(), "runc")
	os.WriteFile(runc, []byte("#!/bin/sh\necho runc version 1.1.5 \"$1\"\n"), 0o755)
	a.runc = plainRunc(runc)

	h, err := a.Hello(ctx, &agentapi.HelloRequest{Version: agentapi.ProtocolVersion})
	if err != nil || h.AgentVersion != "v1" || h.Version != agentapi.ProtocolVersion || h.StartedAt.AsTime().Unix() != 100 {
		t.Fatalf("hello %v %v", h, err)
	}
	c, err := a.Check(ctx, &agentapi.CheckRequest{Runtime: true})
	if err != nil || !c.ModulesReady || c.RuntimeVersion != "runc version 1.1.5 --version" || c.MemTotalBytes == 0 {
		t.Fatalf("check %v %v", c, err)
	}
	if _, err := a.SyncClock(ctx, &agentapi.SyncClockRequest{}); err == nil {
		t.Error("SyncClock without a time accepted")
	}
	want := time.Unix(2_000_000_000, 5)
	if _, err := a.SyncClock(ctx, &agentapi.SyncClockRequest{HostTime: timestamp(want)}); err != nil || !set.Equal(want) {
		t.Errorf("clock set to %v (%v)", set, err)
	}
	// Shutdown is not exercised here: it kills every process it can.
	if hello, err := agentapi.ParseChannelHello(a.channelHello()); err != nil || hello.Agent != "v1" || hello.Protocol != agentapi.ProtocolVersion {
		t.Errorf("channel hello %+v %v", hello, err)
	}
}
