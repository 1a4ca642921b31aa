// Package metricstest reads Prometheus metrics as flat series, for tests:
// from a collector, or from the text a metrics endpoint serves.
package metricstest

import (
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Series maps a series, written name{label="value",...} with its labels
// sorted, to its value. A histogram gives name_count and name_sum series
// (its buckets are left out).
type Series map[string]float64

// Gather collects col in a registry of its own (which also checks that its
// descriptions are consistent).
func Gather(col prometheus.Collector) (Series, error) {
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(col); err != nil {
		return nil, err
	}
	fams, err := reg.Gather()
	if err != nil {
		return nil, err
	}
	return flatten(fams), nil
}

// Parse reads the text exposition format a metrics endpoint serves.
func Parse(r io.Reader) (Series, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	m, err := p.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parsing metrics: %w", err)
	}
	fams := make([]*dto.MetricFamily, 0, len(m))
	for _, f := range m {
		fams = append(fams, f)
	}
	return flatten(fams), nil
}

// Key writes the series of name with labels (pairs of name and value).
func Key(name string, labels ...string) string {
	var ls []string
	for i := 0; i+1 < len(labels); i += 2 {
		ls = append(ls, fmt.Sprintf("%s=%q", labels[i], labels[i+1]))
	}
	sort.Strings(ls)
	return name + "{" + strings.Join(ls, ",") + "}"
}

// Names returns the metric names of the series that start with prefix.
func (s Series) Names(prefix string) []string {
	seen := map[string]bool{}
	for k := range s {
		if n := k[:strings.IndexByte(k, '{')]; strings.HasPrefix(n, prefix) {
			seen[n] = true
		}
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func flatten(fams []*dto.MetricFamily) Series {
	out := Series{}
	for _, f := range fams {
		for _, m := range f.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, l.GetName(), l.GetValue())
			}
			switch {
			case m.Histogram != nil:
				out[Key(f.GetName()+"_count", labels...)] = float64(m.GetHistogram().GetSampleCount())
				out[Key(f.GetName()+"_sum", labels...)] = m.GetHistogram().GetSampleSum()
			case m.Counter != nil:
				out[Key(f.GetName(), labels...)] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				out[Key(f.GetName(), labels...)] = m.GetGauge().GetValue()
			case m.Untyped != nil:
				out[Key(f.GetName(), labels...)] = m.GetUntyped().GetValue()
			}
		}
	}
	return out
}
