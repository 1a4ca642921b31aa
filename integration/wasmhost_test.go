//go:build e2e

package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// hostCrashCeiling bounds how long the daemon may take to report the
// containers of a crashed Wasm host exited. The daemon notices the broken
// connection at once (well under a second here); the ceiling only catches a
// daemon that waits for a later call or a timeout to find out.
const hostCrashCeiling = 5 * time.Second

// TestWasmHostCrash: when kuasar-wasm-host dies (kill -9), every Wasm
// container it ran is reported exited (255) promptly, without any CRI call
// to prompt it; stop and remove work with the host gone, and release the
// containers' cgroups; the next container starts a new host and runs.
func TestWasmHostCrash(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-crash")
	other := d.podConfig("wasm-crash-other")
	op := d.runPod(t, kuasarWasm, other)
	ids := []string{
		d.run(t, pod, podCfg, wasmConfig("ticker", images.WasmLayer, "tick")),
		d.run(t, pod, podCfg, wasmConfig("loop", images.WasmRootfs, "loop")),
		d.run(t, op, other, wasmConfig("sleeper", images.WasmLayer, "sleep")),
	}
	d.waitLog(t, ids[0], "tick 2", 10*time.Second)
	d.waitLog(t, ids[1], "looping", 10*time.Second)
	d.waitLog(t, ids[2], "sleeping", 10*time.Second)
	var cgroups []string
	for _, id := range ids {
		cg := filepath.Join("/sys/fs/cgroup/cpu", d.containerCgroup(t, id))
		if _, err := os.Stat(cg); err != nil {
			t.Fatalf("container %s has no CPU cgroup: %v", short(id), err)
		}
		cgroups = append(cgroups, cg)
	}

	c := d.wasmHostClient()
	h, err := c.Connect(ctx(t))
	c.Close()
	must(t, err, "reaching the wasm host")
	begin := time.Now()
	must(t, syscall.Kill(int(h.GetPid()), syscall.SIGKILL), "kill -9 of the wasm host")

	// Reported exited, 255, by the daemon on its own: only status reads
	// here, which ask the daemon's records, never the host.
	for _, id := range ids {
		st := d.waitState(t, id, runtimeapi.ContainerState_CONTAINER_EXITED, hostCrashCeiling-time.Since(begin))
		if st.ExitCode != 255 {
			t.Errorf("container %s of the crashed host: exit %d, want 255", short(id), st.ExitCode)
		}
	}
	t.Logf("all containers of the crashed host reported exited after %v", time.Since(begin))

	// Stop and remove are bounded and work with no host.
	for _, id := range ids {
		bounded, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := d.RS.StopContainer(bounded, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: 2})
		must(t, err, "stopping a container of the crashed host")
		_, err = d.RS.RemoveContainer(bounded, &runtimeapi.RemoveContainerRequest{ContainerId: id})
		must(t, err, "removing a container of the crashed host")
		cancel()
	}
	for _, cg := range cgroups {
		if _, err := os.Stat(cg); !os.IsNotExist(err) {
			t.Errorf("the cgroup %s of a container of the crashed host is left: %v", cg, err)
		}
	}

	// The next container, in the same pod and in a new one, gets a new host.
	next := d.run(t, pod, podCfg, wasmConfig("next", images.WasmLayer, "echo", "after the crash"))
	if st, log := d.finished(t, next); st.ExitCode != 0 || !strings.Contains(log, "after the crash") {
		t.Errorf("container after the crash: exit %d\n%s", st.ExitCode, log)
	}
	d.stopRemove(t, next, 0)
	fresh := d.podConfig("wasm-crash-next")
	fp := d.runPod(t, kuasarWasm, fresh)
	sl := d.run(t, fp, fresh, wasmConfig("sleeper", images.WasmLayer, "sleep"))
	d.waitLog(t, sl, "sleeping", 10*time.Second)
	c = d.wasmHostClient()
	h2, err := c.Connect(ctx(t))
	c.Close()
	must(t, err, "reaching the new wasm host")
	if h2.GetPid() == h.GetPid() || h2.GetBoot() == h.GetBoot() {
		t.Errorf("still the crashed host: %+v", h2)
	}
	d.removePod(t, fp)
	d.removePod(t, op)
	d.removePod(t, pod)
}

// containerCgroup is a container's cgroup path, as its OCI spec names it.
func (d *Daemon) containerCgroup(t *testing.T, id string) string {
	t.Helper()
	r, err := d.RS.ContainerStatus(ctx(t), &runtimeapi.ContainerStatusRequest{ContainerId: id, Verbose: true})
	must(t, err, "ContainerStatus")
	info := r.Info["info"]
	const key = `"cgroupsPath":"`
	i := strings.Index(info, key)
	if i < 0 {
		t.Fatalf("no cgroupsPath in the status of %s", short(id))
	}
	rest := info[i+len(key):]
	return rest[:strings.IndexByte(rest, '"')]
}

// TestWasmHostCrashWhileDaemonDown: the host dies while the daemon is down;
// the restarted daemon reports its containers exited (255) and removes
// them, with the cgroups the host had made for them.
func TestWasmHostCrashWhileDaemonDown(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-crash-down")
	c := d.run(t, pod, podCfg, wasmConfig("sleeper", images.WasmLayer, "sleep"))
	d.waitLog(t, c, "sleeping", 10*time.Second)
	cg := filepath.Join("/sys/fs/cgroup/cpu", d.containerCgroup(t, c))
	hc := d.wasmHostClient()
	h, err := hc.Connect(ctx(t))
	hc.Close()
	must(t, err, "reaching the wasm host")

	d.kill(syscall.SIGKILL)
	must(t, syscall.Kill(int(h.GetPid()), syscall.SIGKILL), "kill -9 of the wasm host")
	d.start()

	st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 30*time.Second)
	if st.ExitCode != 255 {
		t.Errorf("container of the host that died while the daemon was down: exit %d, want 255", st.ExitCode)
	}
	d.stopRemove(t, c, 2)
	if _, err := os.Stat(cg); !os.IsNotExist(err) {
		t.Errorf("the cgroup %s of the container is left: %v", cg, err)
	}
	d.removePod(t, pod)
}
