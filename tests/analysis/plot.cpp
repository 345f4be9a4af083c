// include/lora/analysis/plot.hpp: the spectrum chart's lines are the per-type medians of
// σ_i/σ₁ (read back from the SVG's own grid and compared with a float64 median), legends,
// markers, escaping, and a zero module.
#include <lora/analysis/plot.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace lora;
using namespace lora::analysis;

namespace {

std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (auto p = s.find(what); p != std::string::npos; p = s.find(what, p + what.size())) ++n;
  return n;
}

// The value of attribute `name` in the element starting at `pos`.
std::string attribute(const std::string& s, std::size_t pos, const std::string& name) {
  const auto end = s.find('>', pos);
  const auto a = s.find(" " + name + "=\"", pos);
  REQUIRE(a < end);
  const auto b = a + name.size() + 3;
  return s.substr(b, s.find('"', b) - b);
}

// Every polyline's points as (x, y) pairs, in document order.
std::vector<std::vector<std::pair<double, double>>> polylines(const std::string& svg) {
  std::vector<std::vector<std::pair<double, double>>> out;
  for (auto p = svg.find("<polyline"); p != std::string::npos; p = svg.find("<polyline", p + 1)) {
    const std::string pts = attribute(svg, p, "points");
    std::vector<std::pair<double, double>> line;
    std::size_t i = 0;
    while (i < pts.size()) {
      const auto comma = pts.find(',', i), space = pts.find(' ', comma);
      line.emplace_back(std::stod(pts.substr(i, comma - i)), std::stod(pts.substr(comma + 1, space - comma - 1)));
      i = space + 1;
    }
    out.push_back(line);
  }
  return out;
}

// y of the horizontal grid lines (one per decade, "1" first), read off the SVG.
std::vector<double> decade_lines(const std::string& svg) {
  std::vector<double> ys;
  for (auto p = svg.find("<line"); p != std::string::npos; p = svg.find("<line", p + 1))
    if (attribute(svg, p, "stroke") == "#e3e3e3") ys.push_back(std::stod(attribute(svg, p, "y1")));
  return ys;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

ModuleReport module(const std::string& name, Vector<double> sigma, const std::vector<double>& thresholds) {
  ModuleReport m;
  m.name = name;
  m.out_features = 64, m.in_features = 48, m.rank = sigma.size();
  m.singular_values = std::move(sigma);
  m.metrics = spectrum_metrics(m.singular_values, m.out_features, m.in_features, thresholds);
  return m;
}

}  // namespace

TEST_CASE("spectrum_svg draws each module type's median normalised spectrum", "[analysis][plot]") {
  Generator gen(test::fresh_seed());
  const std::vector<double> thresholds = {0.9, 0.99};
  const Index r = 8;
  auto spectrum = [&] {  // descending, positive, fresh each time
    Vector<double> s(r);
    double v = gen.uniform(0.5, 4.0);
    for (Index i = 0; i < r; ++i) s(i) = v, v *= gen.uniform(0.2, 0.9);
    return s;
  };
  AdapterReport rep;
  rep.thresholds = thresholds;
  for (int layer = 0; layer < 3; ++layer) rep.modules.push_back(module(fmt::format("layers.{}.q_proj", layer), spectrum(), thresholds));
  for (int layer = 0; layer < 2; ++layer) rep.modules.push_back(module(fmt::format("layers.{}.v_proj", layer), spectrum(), thresholds));
  rep.modules.push_back(module("layers.0.o_proj", Vector<double>::Zero(r), thresholds));  // a zero ΔW
  for (auto [tau, k] : {std::pair{0.9, Index{3}}, std::pair{0.99, Index{6}}}) {
    RankRecommendation rec;
    rec.tau = tau, rec.rank = k;
    rep.recommendations.push_back(rec);
  }

  const std::string svg = spectrum_svg(rep, "a<b & \"c\"");
  CHECK(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
  CHECK(svg.size() >= 7);
  CHECK(svg.substr(svg.size() - 7) == "</svg>\n");
  CHECK(svg.find("a&lt;b &amp; &quot;c&quot;") != std::string::npos);
  CHECK(svg.find("a<b") == std::string::npos);
  CHECK(svg.find(">q_proj (3)<") != std::string::npos);
  CHECK(svg.find(">v_proj (2)<") != std::string::npos);
  CHECK(svg.find(">o_proj (1)<") != std::string::npos);
  CHECK(svg.find(">90%: r = 3<") != std::string::npos);
  CHECK(svg.find(">99%: r = 6<") != std::string::npos);
  CHECK(count(svg, "stroke-dasharray") == 3);  // two recommendations and their legend entry

  const auto grid = decade_lines(svg);
  REQUIRE(grid.size() >= 2);
  const double y1 = grid.front(), per_decade = (grid.back() - grid.front()) / double(grid.size() - 1);
  const auto lines = polylines(svg);
  REQUIRE(lines.size() == 3);  // q_proj, v_proj, o_proj in order of first appearance
  for (int g = 0; g < 2; ++g) {
    INFO((g == 0 ? "q_proj" : "v_proj"));
    const auto& line = lines[static_cast<std::size_t>(g)];
    REQUIRE(static_cast<Index>(line.size()) == r);
    for (Index i = 0; i < r; ++i) {
      std::vector<double> v;
      for (const auto& m : rep.modules)
        if (module_type(m.name) == (g == 0 ? "q_proj" : "v_proj"))
          v.push_back(m.singular_values(i) / m.singular_values(0));
      const double want = median(v);
      const double got = std::pow(10.0, -(line[static_cast<std::size_t>(i)].second - y1) / per_decade);
      INFO("i = " << i << ", want " << want << ", got " << got);
      // coordinates are printed to 0.1 px: the point and the grid are each off by up to 0.05 px,
      // the decade spacing by 0.1 px / decades — at most 0.2 px, a relative error of ln(10)·0.2/per_decade
      CHECK(std::abs(got - want) <= std::log(10.0) * 0.2 / per_decade * want);
      if (i > 0) CHECK(line[static_cast<std::size_t>(i)].first > line[static_cast<std::size_t>(i - 1)].first);
    }
  }
  // the zero module's line lies on the chart's floor (the last decade line)
  for (const auto& [x, y] : lines[2]) CHECK(y == Approx(grid.back()).margin(0.051));
  // a marker per type and threshold (every median energy rank is within r), and the legend's two
  CHECK(count(svg, "fill=\"white\" stroke=") == 3 * 2 + 2);
}
