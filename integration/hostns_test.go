//go:build e2e

package integration

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestHostNamespaces runs pods on the node's network, IPC and PID
// namespaces, each alone, and checks that their containers are in the
// node's namespace of that kind and in the pod's own of the others (a
// pod on the node's network keeps the node's hostname too).
func TestHostNamespaces(t *testing.T) {
	node := map[string]string{}
	for _, ns := range []string{"net", "ipc", "uts", "pid"} {
		l, err := os.Readlink("/proc/self/ns/" + ns)
		if err != nil {
			t.Fatal(err)
		}
		node[ns] = l
	}
	tests := []struct {
		name   string
		opts   *runtimeapi.NamespaceOption
		onNode []string
	}{
		{"network", &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE, Pid: runtimeapi.NamespaceMode_CONTAINER}, []string{"net", "uts"}},
		{"ipc", &runtimeapi.NamespaceOption{Ipc: runtimeapi.NamespaceMode_NODE, Pid: runtimeapi.NamespaceMode_CONTAINER}, []string{"ipc"}},
		{"pid", &runtimeapi.NamespaceOption{Pid: runtimeapi.NamespaceMode_NODE}, []string{"pid"}},
	}
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{})
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					podCfg := d.podConfig("host-" + tt.name)
					podCfg.Linux.SecurityContext.NamespaceOptions = tt.opts
					if slices.Contains(tt.onNode, "uts") {
						podCfg.Hostname = "" // the node's
					}
					pod := d.runPod(t, handler, podCfg)
					cfg := ctrConfig("c", "sleep", "1000")
					cfg.Linux.SecurityContext.NamespaceOptions = tt.opts
					c := d.run(t, pod, podCfg, cfg)
					out, stderr, code := d.execSync(t, c, "sh", "-c", "for ns in net ipc uts pid; do readlink /proc/self/ns/$ns; done")
					if code != 0 {
						t.Fatalf("readlink exited %d: %s", code, stderr)
					}
					got := strings.Fields(out)
					if len(got) != 4 {
						t.Fatalf("readlink printed %q", out)
					}
					for i, ns := range []string{"net", "ipc", "uts", "pid"} {
						want := slices.Contains(tt.onNode, ns)
						if on := got[i] == node[ns]; on != want {
							t.Errorf("%s namespace %s: on the node's = %v, want %v", ns, got[i], on, want)
						}
					}
					if slices.Contains(tt.onNode, "pid") {
						// The node's processes are visible, the test's own among them.
						if out, _, _ := d.execSync(t, c, "cat", fmt.Sprintf("/proc/%d/comm", os.Getpid())); out == "" {
							t.Errorf("the test process %d is not visible from a host-PID container", os.Getpid())
						}
					}
					d.stopRemove(t, c, 0)
					d.removePod(t, pod)
				})
			}
		})
	}
}
