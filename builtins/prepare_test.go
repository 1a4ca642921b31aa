package builtins

import (
	"slices"
	"strings"
	"testing"

	"github.com/containerd/plugin"
)

// The Kuasar controllers recover their sandboxes and open their task
// endpoints at init; containerd's task runtime re-dials those endpoints at
// its own init. So every Kuasar plugin must come first.
func TestPrepareOrdersKuasarBeforeTaskRuntime(t *testing.T) {
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	order := InitOrder()
	taskIdx := slices.Index(order, taskRuntimePluginURI)
	if taskIdx < 0 {
		t.Fatalf("%s not registered", taskRuntimePluginURI)
	}
	var kuasar []string
	for i, uri := range order {
		if strings.Contains(uri, "kuasar") {
			kuasar = append(kuasar, uri)
			if i > taskIdx {
				t.Errorf("%s initialises after %s", uri, taskRuntimePluginURI)
			}
		}
	}
	for _, want := range []string{"io.containerd.sandbox.controller.v1.kuasar-runc", "io.containerd.sandbox.controller.v1.kuasar-wasm", "io.containerd.sandbox.controller.v1.kuasar-appkernel", "io.containerd.kuasar.monitor.v1.keeper"} {
		if !slices.Contains(kuasar, want) {
			t.Errorf("%s is not registered (have %v)", want, kuasar)
		}
	}
	// Running it twice changes nothing.
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	if again := InitOrder(); !slices.Equal(order, again) {
		t.Fatal("Prepare is not idempotent")
	}
}

func TestIsKuasar(t *testing.T) {
	tests := []struct {
		r    plugin.Registration
		want bool
	}{
		{plugin.Registration{Type: "io.containerd.sandbox.controller.v1", ID: "kuasar-runc"}, true},
		{plugin.Registration{Type: "io.containerd.sandbox.controller.v1", ID: "podsandbox"}, false},
		{plugin.Registration{Type: "io.containerd.kuasar.monitor.v1", ID: "keeper"}, true},
		{plugin.Registration{Type: "io.containerd.runtime.v2", ID: "task"}, false},
	}
	for _, tt := range tests {
		if got := IsKuasar(&tt.r); got != tt.want {
			t.Errorf("IsKuasar(%s) = %v", tt.r.URI(), got)
		}
	}
}

func TestDefaultHandlersInCRIConfig(t *testing.T) {
	if err := Prepare(); err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, r := range registryGraph() {
		if r.URI() == criRuntimePluginURI {
			cfg := dump(t, r.Config)
			found = strings.Contains(cfg, "kuasar-runc") && strings.Contains(cfg, "kuasar-wasm") && strings.Contains(cfg, "kuasar-gvisor") && strings.Contains(cfg, "kuasar-appkernel")
		}
	}
	if !found {
		t.Fatal("the CRI runtime plugin's defaults lack the kuasar-runc, kuasar-wasm or kuasar-gvisor handler")
	}
}
