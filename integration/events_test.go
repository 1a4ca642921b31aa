//go:build e2e

package integration

import (
	"context"
	"slices"
	"testing"
	"time"

	eventtypes "github.com/containerd/containerd/api/events"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/typeurl/v2"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestTaskEvents: the in-process task service publishes task events to
// containerd's exchange, where any containerd client can subscribe.
func TestTaskEvents(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	client, err := containerd.New(d.Addr, containerd.WithDefaultNamespace("k8s.io"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	sctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	evCh, errCh := client.EventService().Subscribe(sctx, `topic~="/tasks/"`)

	podCfg := d.podConfig("events")
	pod := d.runPod(t, kuasarRunc, podCfg)
	c := d.run(t, pod, podCfg, ctrConfig("sleeper", "sleep", "3600"))
	d.execSync(t, c, "true")
	oom := ctrConfig("oom", "sh", "-c", "exec dd if=/dev/zero of=/dev/null bs=64M count=1")
	oom.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 16 << 20}
	o := d.run(t, pod, podCfg, oom)
	d.waitState(t, o, runtimeapi.ContainerState_CONTAINER_EXITED, 20*time.Second)
	d.stopRemove(t, c, 1)

	want := map[string]bool{"/tasks/create": false, "/tasks/start": false, "/tasks/exec-added": false,
		"/tasks/exec-started": false, "/tasks/exit": false, "/tasks/delete": false, "/tasks/oom": false}
	var oomFor string
	deadline := time.After(10 * time.Second)
	for slices.Contains(valuesOf(want), false) {
		select {
		case e := <-evCh:
			want[e.Topic] = true
			if e.Topic == "/tasks/oom" {
				if v, err := typeurl.UnmarshalAny(e.Event); err == nil {
					oomFor = v.(*eventtypes.TaskOOM).ContainerID
				}
			}
		case err := <-errCh:
			t.Fatalf("event subscription: %v", err)
		case <-deadline:
			t.Fatalf("events seen: %v", want)
		}
	}
	if oomFor != o {
		t.Fatalf("OOM event for %q, want the memory hog %q", short(oomFor), short(o))
	}
}

func valuesOf(m map[string]bool) []bool {
	var out []bool
	for _, v := range m {
		out = append(out, v)
	}
	return out
}
