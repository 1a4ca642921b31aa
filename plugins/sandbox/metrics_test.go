package sandbox

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics/metricstest"
)

// criSandbox is a sandbox as CRI creates it, with the runtime handler in
// its metadata extension (CRI's store writes it versioned).
func criSandbox(id, handler string) sandbox.Sandbox {
	md := []byte(`{"Version":"v1","Metadata":{"ID":"` + id + `","Name":"pod","RuntimeHandler":"` + handler + `"}}`)
	return sandbox.Sandbox{ID: id, Extensions: map[string]typeurl.Any{
		criMetadataKey: &anypb.Any{TypeUrl: "github.com/containerd/cri/pkg/store/sandbox/Metadata", Value: md},
	}}
}

func gather(t *testing.T, m *metrics.Controller) metricstest.Series {
	t.Helper()
	s, err := metricstest.Gather(m.Collector())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sandboxes(handler, state string) string {
	return metricstest.Key("kuasar_sandboxes", "sandboxer", "kuasar-test", "handler", handler, "state", state)
}

func perHandler(name, handler string, more ...string) string {
	return metricstest.Key(name, append([]string{"sandboxer", "kuasar-test", "handler", handler}, more...)...)
}

func expect(t *testing.T, s metricstest.Series, want map[string]float64) {
	t.Helper()
	for k, v := range want {
		got, ok := s[k]
		if !ok {
			t.Errorf("no series %s", k)
		} else if got != v {
			t.Errorf("%s = %v, want %v", k, got, v)
		}
	}
}

func TestControllerMetrics(t *testing.T) {
	k := &fakeKind{}
	paths := testPaths(t)
	m := metrics.NewController("kuasar-test")
	c := NewController("kuasar-test", k, paths, nopPublisher{}, WithMetrics(m))

	// Before any sandbox: the controller's own handler, at 0.
	expect(t, gather(t, m), map[string]float64{
		sandboxes("kuasar-test", "created"): 0, sandboxes("kuasar-test", "ready"): 0, sandboxes("kuasar-test", "notready"): 0,
	})

	if err := c.Create(nsCtx(), criSandbox("sb1", "fast")); err != nil {
		t.Fatal(err)
	}
	expect(t, gather(t, m), map[string]float64{sandboxes("fast", "created"): 1, sandboxes("fast", "ready"): 0})
	if _, err := c.Start(nsCtx(), "sb1"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Start(nsCtx(), "sb1"); err == nil {
		t.Fatal("second start did not fail")
	}
	s := gather(t, m)
	expect(t, s, map[string]float64{
		sandboxes("fast", "created"): 0, sandboxes("fast", "ready"): 1,
		perHandler("kuasar_sandbox_start_duration_seconds_count", "fast"): 1,
		perHandler("kuasar_sandbox_start_failures_total", "fast"):         1,
	})
	if s[perHandler("kuasar_sandbox_start_duration_seconds_sum", "fast")] <= 0 {
		t.Errorf("start duration sum %v", s[perHandler("kuasar_sandbox_start_duration_seconds_sum", "fast")])
	}

	// A sandbox not from CRI counts under the controller's ID.
	createStart(t, c, "sb2")
	if err := c.Stop(nsCtx(), "sb1"); err != nil {
		t.Fatal(err)
	}
	expect(t, gather(t, m), map[string]float64{
		sandboxes("fast", "ready"): 0, sandboxes("fast", "notready"): 1, sandboxes("kuasar-test", "ready"): 1,
		perHandler("kuasar_sandbox_start_duration_seconds_count", "kuasar-test"): 1,
	})
	if err := c.Shutdown(nsCtx(), "sb1"); err != nil {
		t.Fatal(err)
	}
	expect(t, gather(t, m), map[string]float64{sandboxes("fast", "notready"): 0, sandboxes("fast", "ready"): 0})

	k.failCreate = errors.New("no")
	if err := c.Create(nsCtx(), criSandbox("sb3", "fast")); err == nil {
		t.Fatal("create did not fail")
	}
	k.failCreate = nil
	expect(t, gather(t, m), map[string]float64{
		perHandler("kuasar_sandbox_start_failures_total", "fast"): 2, sandboxes("fast", "created"): 0,
	})

	// A restart: sb2 is taken back; a sandbox of handler fast whose kind
	// state is gone is lost; a directory without a record is discarded.
	if err := c.Create(nsCtx(), criSandbox("sb4", "fast")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Start(nsCtx(), "sb4"); err != nil {
		t.Fatal(err)
	}
	e, _ := c.get("sb4")
	e.mu.Lock()
	e.sb.State = []byte(`{"garbled":true}`)
	if err := c.save(e); err != nil {
		t.Fatal(err)
	}
	e.mu.Unlock()
	if err := os.MkdirAll(filepath.Join(paths.State, "halfmade"), 0o700); err != nil {
		t.Fatal(err)
	}
	m2 := metrics.NewController("kuasar-test")
	c2 := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{}, WithMetrics(m2))
	if err := c2.Recover(nsCtx()); err != nil {
		t.Fatal(err)
	}
	expect(t, gather(t, m2), map[string]float64{
		perHandler("kuasar_sandbox_recoveries_total", "kuasar-test", "result", "recovered"): 1,
		perHandler("kuasar_sandbox_recoveries_total", "fast", "result", "lost"):             1,
		perHandler("kuasar_sandbox_recoveries_total", "kuasar-test", "result", "discarded"): 1,
		sandboxes("kuasar-test", "ready"):                                                   1,
		sandboxes("fast", "notready"):                                                       1,
	})
}

// The metrics' names follow Prometheus' conventions, and a scrape takes no
// sandbox's lock (an operation may hold it for seconds).
func TestMetricNames(t *testing.T) {
	m := metrics.NewController("kuasar-test")
	c := NewController("kuasar-test", &fakeKind{}, testPaths(t), nopPublisher{}, WithMetrics(m))
	createStart(t, c, "sb1")
	m.ContainerStarted("kuasar-test", 1)
	m.ContainerStartFailed("kuasar-test")
	m.ContainerRecovered("kuasar-test", metrics.Recovered)
	m.SandboxRecovered("kuasar-test", metrics.Recovered)
	m.VMBooted("kuasar-test", "tcg", "cold", 1)
	e, _ := c.get("sb1")
	e.mu.Lock()
	s := gather(t, m)
	e.mu.Unlock()
	want := []string{
		"kuasar_container_recoveries_total",
		"kuasar_container_start_duration_seconds_count",
		"kuasar_container_start_duration_seconds_sum",
		"kuasar_container_start_failures_total",
		"kuasar_sandbox_recoveries_total",
		"kuasar_sandbox_start_duration_seconds_count",
		"kuasar_sandbox_start_duration_seconds_sum",
		"kuasar_sandboxes",
		"kuasar_vm_boot_duration_seconds_count",
		"kuasar_vm_boot_duration_seconds_sum",
	}
	got := s.Names("kuasar_")
	if len(got) != len(want) {
		t.Fatalf("metrics %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("metrics %v, want %v", got, want)
		}
	}
	if s[metricstest.Key("kuasar_vm_boot_duration_seconds_count", "sandboxer", "kuasar-test", "handler", "kuasar-test", "accel", "tcg", "boot", "cold")] != 1 {
		t.Fatalf("VM boot not recorded: %v", s)
	}
}
