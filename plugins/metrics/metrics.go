// Package metrics defines the Prometheus metrics of containerd-kuasar's own
// plugins. They are served with containerd's on its metrics endpoint
// (`[metrics] address` in the config, path /v1/metrics), which serves
// Prometheus' default registry.
//
// Every name starts with kuasar_, ends with its base unit (_seconds,
// _bytes) or _total for counters, and takes only low-cardinality labels:
// the controller (sandboxer, a constant label of each controller's
// metrics), the CRI runtime handler, and small closed sets of states and
// results; never a sandbox or container ID.
//
// Nothing here is package-level state: each plugin builds its metrics when
// it initialises and registers them once with Register. The registration
// itself is the only global, and it is the one containerd's metrics
// endpoint requires (go-metrics' Register writes to the same default
// registry).
package metrics

import (
	"fmt"
	"time"

	gometrics "github.com/docker/go-metrics"
	"github.com/prometheus/client_golang/prometheus"
)

// Namespace starts the name of every Kuasar metric.
const Namespace = "kuasar"

// Sandbox states, as the state label of kuasar_sandboxes says them.
const (
	StateCreated  = "created"
	StateReady    = "ready"
	StateNotReady = "notready"
)

// Recovery results, as the result label of the recovery counters says them.
const (
	// Recovered: the kind took the sandbox (or container) back.
	Recovered = "recovered"
	// Lost: it could not be taken back; it is reported ended (255).
	Lost = "lost"
	// Discarded: what an interrupted create left without a record,
	// removed.
	Discarded = "discarded"
)

// startBuckets spans a namespace pod's few milliseconds to a microVM's
// cold boot under software emulation (seconds).
func startBuckets() []float64 {
	return []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
}

// Controller is the metrics of one sandbox controller. Its methods may be
// called on a nil *Controller (they do nothing), so that code under test
// needs none.
type Controller struct {
	ns *gometrics.Namespace

	sandboxStart           gometrics.LabeledTimer
	sandboxStartFailures   gometrics.LabeledCounter
	containerStart         gometrics.LabeledTimer
	containerStartFailures gometrics.LabeledCounter
	sandboxRecoveries      gometrics.LabeledCounter
	containerRecoveries    gometrics.LabeledCounter
	vmBoot                 gometrics.LabeledTimer
}

// NewController returns the metrics of the controller sandboxer (its
// plugin ID, the constant label sandboxer of every series).
func NewController(sandboxer string) *Controller {
	ns := gometrics.NewNamespace(Namespace, "", gometrics.Labels{"sandboxer": sandboxer})
	return &Controller{
		ns: ns,
		sandboxStart: ns.NewLabeledTimerWithBuckets("sandbox_start_duration",
			"Time the controller took to create and start a sandbox (its Create and Start calls), by CRI runtime handler", startBuckets(), "handler"),
		sandboxStartFailures: ns.NewLabeledCounter("sandbox_start_failures",
			"Sandboxes whose create or start failed, by CRI runtime handler", "handler"),
		containerStart: ns.NewLabeledTimerWithBuckets("container_start_duration",
			"Time a container took to be created and started in its sandbox (the task API's Create and Start of its init process), by CRI runtime handler", startBuckets(), "handler"),
		containerStartFailures: ns.NewLabeledCounter("container_start_failures",
			"Containers whose create or start failed in their sandbox, by CRI runtime handler", "handler"),
		sandboxRecoveries: ns.NewLabeledCounter("sandbox_recoveries",
			"Sandboxes found at a daemon start, by CRI runtime handler and result (recovered, lost: reported ended, discarded: an interrupted create's directory removed)", "handler", "result"),
		containerRecoveries: ns.NewLabeledCounter("container_recoveries",
			"Containers found at a daemon start, by CRI runtime handler and result (recovered, lost: reported exited 255)", "handler", "result"),
		vmBoot: ns.NewLabeledTimerWithBuckets("vm_boot_duration",
			"Time from starting a sandbox's VM to its guest agent answering, by CRI runtime handler, accelerator (kvm, tcg) and boot (cold, template)", startBuckets(), "handler", "accel", "boot"),
	}
}

// Collector is everything the controller exports, for Register.
func (c *Controller) Collector() prometheus.Collector { return c.ns }

// Add adds a collector of the controller's own to what it exports: a
// gauge read when the endpoint is scraped. Its descriptions come from
// Desc.
func (c *Controller) Add(col prometheus.Collector) {
	if c != nil {
		c.ns.Add(col)
	}
}

// Desc describes a metric of the controller (kuasar_<name>_<unit>, with
// the constant label sandboxer and the variable labels given).
func (c *Controller) Desc(name, help string, unit gometrics.Unit, labels ...string) *prometheus.Desc {
	return c.ns.NewDesc(name, help, unit, labels...)
}

// SandboxStarted records a sandbox that took d to create and start.
func (c *Controller) SandboxStarted(handler string, d time.Duration) {
	if c != nil {
		c.sandboxStart.WithValues(handler).Update(d)
	}
}

// SandboxStartFailed records a sandbox whose create or start failed.
func (c *Controller) SandboxStartFailed(handler string) {
	if c != nil {
		c.sandboxStartFailures.WithValues(handler).Inc()
	}
}

// ContainerStarted records a container that took d to create and start.
func (c *Controller) ContainerStarted(handler string, d time.Duration) {
	if c != nil {
		c.containerStart.WithValues(handler).Update(d)
	}
}

// ContainerStartFailed records a container whose create or start failed.
func (c *Controller) ContainerStartFailed(handler string) {
	if c != nil {
		c.containerStartFailures.WithValues(handler).Inc()
	}
}

// SandboxRecovered records the result (Recovered, Lost, Discarded) of
// recovering one sandbox at a daemon start.
func (c *Controller) SandboxRecovered(handler, result string) {
	if c != nil {
		c.sandboxRecoveries.WithValues(handler, result).Inc()
	}
}

// ContainerRecovered records the result (Recovered, Lost) of recovering
// one container at a daemon start.
func (c *Controller) ContainerRecovered(handler, result string) {
	if c != nil {
		c.containerRecoveries.WithValues(handler, result).Inc()
	}
}

// VMBooted records a sandbox VM whose guest agent answered d after the VM
// was started: accel is the accelerator (kvm, tcg), boot how it started
// (cold: a kernel boot; template: a clone restored from a template).
// Kinds that run VMs call it (through sandbox.Env.Metrics).
func (c *Controller) VMBooted(handler, accel, boot string, d time.Duration) {
	if c != nil {
		c.vmBoot.WithValues(handler, accel, boot).Update(d)
	}
}

// Register adds a plugin's collector to Prometheus' default registry,
// which containerd's metrics endpoint serves. It is go-metrics' Register
// without the panic: a collector registered twice (a plugin initialised
// twice in one process) is an error to log, not a reason to stop.
func Register(col prometheus.Collector) error {
	if err := prometheus.DefaultRegisterer.Register(col); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	return nil
}

// Gauges is a collector of gauges read when the endpoint is scraped: read
// sends every value, with its labels, in the order of descs.
type Gauges struct {
	descs []*prometheus.Desc
	read  func(emit func(desc *prometheus.Desc, value float64, labels ...string))
}

// NewGauges returns a collector of the gauges descs, whose values read
// gives at each scrape.
func NewGauges(read func(emit func(desc *prometheus.Desc, value float64, labels ...string)), descs ...*prometheus.Desc) *Gauges {
	return &Gauges{descs: descs, read: read}
}

// Describe implements prometheus.Collector.
func (g *Gauges) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range g.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (g *Gauges) Collect(ch chan<- prometheus.Metric) {
	g.read(func(desc *prometheus.Desc, value float64, labels ...string) {
		m, err := prometheus.NewConstMetric(desc, prometheus.GaugeValue, value, labels...)
		if err != nil {
			m = prometheus.NewInvalidMetric(desc, err)
		}
		ch <- m
	})
}
