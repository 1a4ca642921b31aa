package builtins

import (
	"testing"

	"github.com/containerd/plugin"
	"github.com/containerd/plugin/registry"
	"github.com/pelletier/go-toml/v2"
)

func registryGraph() []plugin.Registration {
	return registry.Graph(func(*plugin.Registration) bool { return false })
}

func dump(t *testing.T, v any) string {
	t.Helper()
	b, err := toml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
