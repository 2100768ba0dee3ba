"""Reports that say how far a city's installations layer can be trusted (``tools/city_report.py``).

* :mod:`.accuracy`: the layer against labelled installations over a labelled area;
* :mod:`.registry`: the layer against a registry of installations (points with a capacity);
* :mod:`.change`: two layers of the same area (two flights) against each other;
* :mod:`.review`: the ``review`` flag of an installation (low confidence, implausible size);
* :mod:`.capacity`: estimated kWp with its low and high bounds;
* :mod:`.gpkg` and :mod:`.styles`: the one GeoPackage writer (GeoPackage 1.2, a default QGIS
  style per layer in ``layer_styles``);
* :mod:`.inputs`, :mod:`.matching`, :mod:`.maps`: reading and checking the inputs, matching by
  spatial index, the PNG maps.
"""
