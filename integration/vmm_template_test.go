//go:build e2e || bench

package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// TestVMMTemplate checks the driver's side of issue 12 (pods from a booted
// template): a VM booted with its RAM in a shared file on /dev/shm, saved
// once its agent is up (x-ignore-shared: the RAM stays in the file), and
// clones restored from it with the file mapped private. Each clone's agent
// answers on the clone's own channel (the session reset clears what the
// template left in flight), its clock is set, and the figures are printed:
// save time and size, exec to the clone's Hello, PSS per clone with two
// running.
func TestVMMTemplate(t *testing.T) {
	if _, err := os.Stat("/usr/bin/qemu-system-x86_64"); err != nil {
		t.Skipf("skipping the microVM template test: qemu-system-x86_64 is not installed: %v", err)
	}
	img := guestImage(t)
	accel, err := hypervisor.ResolveAccel("auto", hypervisor.KVMUsable())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	memMiB, tbMiB := envInt("KUASAR_VMM_MEMORY_MIB", 128), envInt("KUASAR_VMM_TB_MIB", 64)

	ram := filepath.Join("/dev/shm", "kvt-template-"+randHex(4))
	t.Cleanup(func() { os.Remove(ram) })
	stateDir := t.TempDir()
	state := filepath.Join(stateDir, "template.state")

	// The template: boot, wait for the agent and its modules, save.
	tcfg := vmConfig(t, img, accel, memMiB, tbMiB)
	tcfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: ram, Share: true}
	tmpl := spawnVM(ctx, t, tcfg)
	tmpl.dialAgent(ctx, t)
	waitModulesThenPSS(ctx, t, tmpl)
	tmplHello, err := tmpl.agent.Hello(ctx, &agentapi.HelloRequest{})
	if err != nil {
		t.Fatal(err)
	}
	tmpl.client.Close() // the saved guest holds no session
	f, err := os.Create(state)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := tmpl.vm.Save(ctx, f, true); err != nil {
		t.Fatalf("save: %v%s", err, tmpl.logs())
	}
	saveTime := time.Since(start)
	f.Close()
	if err := tmpl.vm.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	tmpl.cleanupAndCheck(t)
	st, _ := os.Stat(state)
	t.Logf("template saved in %v: state %d kB (RAM left in %s)", saveTime.Round(time.Millisecond), st.Size()/1024, ram)

	// Two clones.
	var clones []*bootedVM
	for i := range 2 {
		ccfg := vmConfig(t, img, accel, memMiB, tbMiB)
		ccfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: ram, Share: false}
		ccfg.Incoming = true
		c := spawnVM(ctx, t, ccfg)
		f, err := os.Open(state)
		if err != nil {
			t.Fatal(err)
		}
		err = c.vm.Restore(ctx, f, true)
		f.Close()
		if err != nil {
			t.Fatalf("clone %d: restore: %v%s", i, err, c.logs())
		}
		restored := time.Since(c.started)
		c.dialAgent(ctx, t)
		h, err := c.agent.Hello(ctx, &agentapi.HelloRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if h.BootId != tmplHello.BootId {
			t.Errorf("clone %d has boot id %s, the template %s: not a clone?", i, h.BootId, tmplHello.BootId)
		}
		// The clock resumes at the snapshot's time until set.
		chk, err := c.agent.Check(ctx, &agentapi.CheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		lag := time.Since(chk.Now.AsTime())
		if _, err := c.agent.SyncClock(ctx, &agentapi.SyncClockRequest{HostTime: timestamppb.Now()}); err != nil {
			t.Fatal(err)
		}
		chk, err = c.agent.Check(ctx, &agentapi.CheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if off := time.Since(chk.Now.AsTime()); off > time.Minute || off < -time.Minute {
			t.Errorf("clone %d: clock off by %v after SyncClock", i, off)
		}
		t.Logf("clone %d: exec to restored %v, to the agent's Hello %v; clock %v behind before SyncClock",
			i, restored.Round(time.Millisecond), c.ready.Round(time.Millisecond), lag.Round(time.Millisecond))
		clones = append(clones, c)
	}
	time.Sleep(time.Second)
	for i, c := range clones {
		t.Logf("clone %d: %s", i, pssBreakdown(t, c.st.Pid))
	}
	for _, c := range clones {
		if err := c.vm.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		c.cleanupAndCheck(t)
	}
}

// pssBreakdown is a process's PSS, anonymous and file-backed (shared).
func pssBreakdown(t *testing.T, pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	var pss, anon, file, shmem int
	for _, l := range splitLines(string(data)) {
		var k string
		var v int
		if n, _ := fmt.Sscanf(l, "%s %d", &k, &v); n != 2 {
			continue
		}
		switch k {
		case "Pss:":
			pss = v
		case "Pss_Anon:":
			anon = v
		case "Pss_File:":
			file = v
		case "Pss_Shmem:":
			shmem = v
		}
	}
	return fmt.Sprintf("PSS %.1f MiB (anon %.1f, file %.1f, shmem %.1f)", float64(pss)/1024, float64(anon)/1024, float64(file)/1024, float64(shmem)/1024)
}

func splitLines(s string) []string {
	var out []string
	for len(s) > 0 {
		i := 0
		for i < len(s) && s[i] != '\n' {
			i++
		}
		out = append(out, s[:i])
		if i < len(s) {
			i++
		}
		s = s[i:]
	}
	return out
}
